"""medvlm-jax model package: `model, params = vlm.from_pretrained(path)`."""
from __future__ import annotations

import os

from vlm.config import VLMConfig, preset  # noqa: F401


def from_pretrained(path, *, dtype=None, **overrides):
  """Load a checkpoint dir of this project, or a HF Llama / Mistral / Llava / LlavaNext dir.

  Returns (VLM module, params). `dtype` casts HF weights on import (None keeps the stored dtype);
  `overrides` replace VLMConfig fields (e.g. attention='cudnn', dtype='bfloat16', remat='full')."""
  from vlm import checkpoint
  from vlm.model import VLM
  if checkpoint.is_checkpoint(path):
    cfg, params = checkpoint.load(path)
  elif os.path.exists(os.path.join(path, "config.json")):
    from convert import hf
    cfg, params = hf.load_dir(path, dtype=dtype)
  else:
    raise FileNotFoundError(f"{path}: neither a medvlm-jax checkpoint (config.json + params/) "
                            "nor a HF model dir (config.json + safetensors)")
  if overrides:
    cfg = cfg.replace(**overrides)
  return VLM(cfg), params
