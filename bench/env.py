"""The device and versions lines every benchmark table carries (one place, so tables agree)."""
from __future__ import annotations

import platform


def device() -> str:
  """'NVIDIA H200 (gpu)': the first JAX device's kind and the backend."""
  import jax
  d = jax.devices()[0]
  return f"{getattr(d, 'device_kind', d.platform)} ({jax.default_backend()})"


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
