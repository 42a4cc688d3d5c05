"""A CLIP vision tower from a HF CLIP dir, an open_clip dir (e.g. apple/DFN5B-CLIP-ViT-H-14-378),
or a tower checkpoint of this project (`python -m convert import --from open_clip`)."""
from __future__ import annotations

import dataclasses
import os

from convert import hf, open_clip
from data.jsonfile import load_json
from vlm import families, hf as vlm_hf, tensorfile  # reading HF dirs and weight files
from vlm.errors import ConversionError

OPEN_CLIP_STEMS = ("open_clip_model", "open_clip_pytorch_model")
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def is_open_clip(path) -> bool:
  return os.path.exists(os.path.join(path, "open_clip_config.json"))


def load(path, *, select_layer: int = -2, keep_cls: bool = False):
  """-> (VisionConfig, {("vision", canonical HF name): loader})."""
  from vlm import checkpoint
  if is_open_clip(path):
    cfg_file = os.path.join(path, "open_clip_config.json")
    vcfg = open_clip.vision_config(load_json(cfg_file), select_layer, source=cfg_file)
    files = tensorfile.find_weights(path, OPEN_CLIP_STEMS)
    if not files:
      raise ConversionError(f"no open_clip_model.safetensors or open_clip_pytorch_model.bin "
                            f"in {path}")
    raw = tensorfile.read_files(files)
    return (dataclasses.replace(vcfg, keep_cls=keep_cls),
            open_clip.canonical_vision(raw, source=files[0]))
  if checkpoint.is_checkpoint(path):
    cfg, params = checkpoint.load(path)
    if cfg.vision is None or "vision" not in params:
      raise ConversionError(f"{path} has no vision tower")
    vcfg = dataclasses.replace(cfg.vision, select_layer=select_layer, keep_cls=keep_cls)
    sub = {"vision": params["vision"]}
    return vcfg, dict(hf.iter_export(cfg, sub, lambda comp, nm: (comp, nm)))
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ConversionError(f"{path}: not a vision tower (no open_clip_config.json, config.json "
                          "or medvlm-jax checkpoint)")
  d = load_json(cfg_file)
  mt = d.get("model_type")
  if mt == "clip":
    d = d["vision_config"]
  elif families.for_model_type("vision", mt) is None:
    known = ["clip"] + families.model_types("vision") + ["open_clip"]
    raise ConversionError(f"unknown architecture model_type={mt!r} in {cfg_file} "
                          f"({' | '.join(known)})")
  vcfg = vlm_hf.vision_config(d, select_layer, keep_cls)
  pp = os.path.join(path, "preprocessor_config.json")
  if os.path.exists(pp):
    p = load_json(pp)
    if "image_mean" in p:
      vcfg = dataclasses.replace(vcfg, mean=tuple(p["image_mean"]), std=tuple(p["image_std"]))
  files = tensorfile.find_weights(path)
  if not files:
    raise ConversionError(f"no model.safetensors or pytorch_model.bin in {path}")
  out = {}
  for key, t in tensorfile.read_files(files).items():
    if key.startswith(_NOT_VISION):
      continue
    canon = vlm_hf.canonical_name(key)
    if canon is None or canon[0] != "vision":
      raise ConversionError(f"unexpected key {key} in {t.file}")
    out[canon] = t
  return vcfg, out
