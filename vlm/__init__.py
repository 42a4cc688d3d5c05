"""medvlm-jax model package: `model, params = vlm.from_pretrained(path)`.

vlm is the pure model: it reads its own checkpoint dirs (vlm/checkpoint.py) and HF Llama /
Mistral / Llava / LlavaNext dirs (vlm/hf.py, with the family rules of vlm/families), and imports
neither data/ nor convert/ (the other formats are convert/'s: `python -m convert import`)."""
from __future__ import annotations

from vlm.config import VLMConfig, preset  # noqa: F401


def from_pretrained(path, *, dtype=None, **overrides):
  """Load a checkpoint dir of this project or a HF Llama / Mistral / Llava / LlavaNext dir.

  Returns (VLM module, params). `dtype` casts imported weights (None keeps the stored dtype);
  `overrides` naming vlm.config.Runtime fields set the module's runtime (attention='cudnn',
  remat='full', scan_layers=False; runtime=Runtime(...) gives one whole), the others replace
  VLMConfig fields (template='llama3')."""
  from vlm import checkpoint, hf
  from vlm.config import RUNTIME_FIELDS, Runtime
  from vlm.model import VLM
  if checkpoint.looks_like_checkpoint(path):   # load says what a damaged one misses
    cfg, params = checkpoint.load(path)
  elif hf.is_hf_dir(path):
    cfg, params = hf.load_dir(path, dtype=dtype)
  else:
    raise FileNotFoundError(f"{path}: neither a medvlm-jax checkpoint (config.json + params/) "
                            "nor a HF model dir (config.json + safetensors)")
  runtime = overrides.pop("runtime", None) or Runtime()
  knobs = {k: overrides.pop(k) for k in list(overrides) if k in RUNTIME_FIELDS}
  if overrides:
    cfg = cfg.replace(**overrides)
  return VLM(cfg, runtime.replace(**knobs)), params
