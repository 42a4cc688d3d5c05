"""medvlm-jax model package: `model, params = vlm.from_pretrained(path)`.

vlm is the pure model: it reads its own checkpoint dirs (vlm/checkpoint.py) and imports neither
data/ nor convert/. Other formats plug in from the package that knows them: `import convert`
registers the HF Llama / Mistral / Llava / LlavaNext reader (convert/__init__.py)."""
from __future__ import annotations

import os
from typing import Callable

from vlm.config import VLMConfig, preset  # noqa: F401

# name -> (accepts(path) -> bool, read(path, dtype=...) -> (VLMConfig, params)), tried in order
_FORMATS: dict = {}


def register_format(name: str, accepts: Callable, read: Callable) -> None:
  """Teach from_pretrained another checkpoint format (a package above vlm calls this)."""
  _FORMATS[name] = (accepts, read)


def from_pretrained(path, *, dtype=None, **overrides):
  """Load a checkpoint dir of this project, or a dir of a registered format (with `convert`
  imported: a HF Llama / Mistral / Llava / LlavaNext dir).

  Returns (VLM module, params). `dtype` casts imported weights (None keeps the stored dtype);
  `overrides` naming vlm.config.Runtime fields set the module's runtime (attention='cudnn',
  remat='full', scan_layers=False; runtime=Runtime(...) gives one whole), the others replace
  VLMConfig fields (template='llama3')."""
  from vlm import checkpoint
  from vlm.config import RUNTIME_FIELDS, Runtime
  from vlm.model import VLM
  if checkpoint.looks_like_checkpoint(path):   # load says what a damaged one misses
    cfg, params = checkpoint.load(path)
  else:
    read = next((r for ok, r in _FORMATS.values() if ok(path)), None)
    if read is None:
      hint = (" (a HF model dir? `import convert` registers its reader)"
              if os.path.exists(os.path.join(path, "config.json")) and "hf" not in _FORMATS else "")
      raise FileNotFoundError(f"{path}: neither a medvlm-jax checkpoint (config.json + params/) "
                              f"nor a HF model dir (config.json + safetensors){hint}")
    cfg, params = read(path, dtype=dtype)
  runtime = overrides.pop("runtime", None) or Runtime()
  knobs = {k: overrides.pop(k) for k in list(overrides) if k in RUNTIME_FIELDS}
  if overrides:
    cfg = cfg.replace(**overrides)
  return VLM(cfg, runtime.replace(**knobs)), params
