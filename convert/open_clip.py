"""open_clip VisionTransformer weights (e.g. apple/DFN5B-CLIP-ViT-H-14-378) -> canonical HF names.

open_clip fuses q/k/v into `attn.in_proj_weight` [3W, W]; we split it lazily so a big checkpoint is
still read one tensor at a time. The text tower and the visual `proj` are not part of a LLaVA tower.
"""
from __future__ import annotations

import re

from vlm.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionConfig
from vlm.errors import ConversionError

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

# open_clip's CLIPVisionCfg (src/open_clip/model.py) key by key. Read into VisionConfig:
_READ = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs"}
# No effect on the hidden states a LLaVA tower takes (select_layer, before ln_post): pooling and
# projection details, dropout of patches while open_clip trains (identity in eval), a sin-cos
# position table (stored in the weights like a learned one), metadata; timm_* without a timm model.
_NO_EFFECT = {"patch_dropout", "pool_type", "final_ln_after_pool", "output_tokens",
              "attn_pooler_queries", "attn_pooler_heads", "image_seq_len", "global_average_pool",
              "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
              "timm_drop_path", "timm_model_kwargs"}
# The math changes unless the key keeps open_clip's default; none of these is implemented here.
_DEFAULT_ONLY = {"ls_init_value": (None,), "no_ln_pre": (False,), "timm_model_name": (None, ""),
                 "act_kwargs": (None, {}), "attentional_pool": (False,),
                 "pos_embed_type": ("learnable", "sin_cos_2d"), "block_type": (None, "default"),
                 "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
                 "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
                 "input_patchnorm": (False,)}


def _square(v, key: str, source: str) -> int:
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise ConversionError(f"{source}: open_clip vision_cfg {key}={v!r}: only square sizes are "
                            "supported")
    v = v[0]
  return int(v)


def _checked(v: dict, source: str) -> dict:
  """vision_cfg with every key accounted for: one-line ConversionError for a key that would
  change the tower's math and is not supported (or is unknown), instead of a silently different
  tower."""
  for key, value in v.items():
    if key in _READ or key in _NO_EFFECT:
      continue
    if key not in _DEFAULT_ONLY:
      raise ConversionError(f"{source}: open_clip vision_cfg key {key!r} is unknown here and "
                            "may change the tower's math; not supported")
    if value not in _DEFAULT_ONLY[key]:
      raise ConversionError(f"{source}: open_clip vision_cfg {key}={value!r} is not supported: "
                            "the tower it builds computes differently")
  if isinstance(v["layers"], (list, tuple)):
    raise ConversionError(f"{source}: open_clip vision_cfg layers={v['layers']!r} is a ResNet "
                          "tower; only ViT towers are supported")
  norm = dict(v.get("norm_kwargs") or {})
  eps = norm.pop("eps", 1e-5)
  if norm:
    raise ConversionError(f"{source}: open_clip vision_cfg norm_kwargs {sorted(norm)} change the "
                          "tower's LayerNorms and are not supported (only eps)")
  return dict(v, norm_eps=float(eps))


def vision_config(cfg: dict, select_layer: int = -2, *,
                  source: str = "open_clip_config.json") -> VisionConfig:
  """open_clip_config.json (model_cfg.vision_cfg + preprocess_cfg) -> VisionConfig."""
  model = cfg.get("model_cfg", cfg)
  v = _checked(model["vision_cfg"], source)
  width = v["width"]
  heads = width // v.get("head_width", 64)
  pre = cfg.get("preprocess_cfg", {})
  return VisionConfig(
      image_size=_square(v["image_size"], "image_size", source),
      patch_size=_square(v["patch_size"], "patch_size", source), width=width, layers=v["layers"],
      heads=heads, mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
      act="quick_gelu" if model.get("quick_gelu") else "gelu", norm_eps=v["norm_eps"],
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
