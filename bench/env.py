"""The versions line every benchmark table carries (one place, so the tables agree)."""
from __future__ import annotations

import platform


def versions(*modules: str) -> str:
  """'jax 0.11.2, torch 2.11.0 (CUDA 13.0), ..., python 3.12.3' for the modules importable here."""
  out = []
  for mod in modules:
    try:
      m = __import__(mod)
    except ImportError:
      continue
    cuda = getattr(getattr(m, "version", None), "cuda", None) if mod == "torch" else None
    out.append(f"{mod} {m.__version__}" + (f" (CUDA {cuda})" if cuda else ""))
  return ", ".join(out + [f"python {platform.python_version()}"])
