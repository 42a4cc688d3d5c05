"""open_clip VisionTransformer weights (e.g. apple/DFN5B-CLIP-ViT-H-14-378) -> canonical HF names.

open_clip fuses q/k/v into `attn.in_proj_weight` [3W, W]; we split it lazily so a big checkpoint is
still read one tensor at a time. The text tower and the visual `proj` are not part of a LLaVA tower.
"""
from __future__ import annotations

import re

from convert.hf import ConversionError
from vlm.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionConfig

_SIMPLE = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
IGNORED = ("proj",)  # visual projection to the joint embedding space: unused by LLaVA towers


def vision_config(cfg: dict, select_layer: int = -2) -> VisionConfig:
  """open_clip_config.json (model_cfg.vision_cfg + preprocess_cfg) -> VisionConfig."""
  model = cfg.get("model_cfg", cfg)
  v = model["vision_cfg"]
  width = v["width"]
  heads = width // v.get("head_width", 64)
  pre = cfg.get("preprocess_cfg", {})
  return VisionConfig(
      image_size=v["image_size"], patch_size=v["patch_size"], width=width, layers=v["layers"],
      heads=heads, mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
      act="quick_gelu" if model.get("quick_gelu") else "gelu", norm_eps=1e-5,
      select_layer=select_layer, mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)),
      std=tuple(pre.get("std", OPENAI_CLIP_STD)), proj_dim=model.get("embed_dim"))


def canonical_vision(tensors: dict, *, source: str = "<memory>") -> dict:
  """{open_clip key: loader or array} -> {("vision", canonical HF name): loader}."""
  out = {}
  for key, t in tensors.items():
    k = key[len("visual."):] if key.startswith("visual.") else None
    if k is None:
      continue  # text tower, logit_scale, ...
    if k in IGNORED:
      continue
    if k in _SIMPLE:
      out[("vision", _SIMPLE[k])] = t
      continue
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", k)
    if not m:
      raise ConversionError(f"unexpected key {key} in {source}")
    i, mod, wb = m.groups()
    if mod == "attn.in_proj":
      for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[("vision", f"encoder.layers.{i}.self_attn.{name}.{wb}")] = _third(t, j)
    elif mod in _BLOCK:
      out[("vision", f"encoder.layers.{i}.{_BLOCK[mod]}.{wb}")] = t
    else:
      raise ConversionError(f"unexpected key {key} in {source}")
  return out


def _third(t, j):
  def load():
    x = t() if callable(t) else t
    n = x.shape[0] // 3
    return x[j * n:(j + 1) * n]
  return load
