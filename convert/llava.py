"""Checkpoints of the original LLaVA / LLaVA-Med code base (haotian-liu/LLaVA), in and out.

Weights, as LlavaLlamaForCausalLM / LlavaMistralForCausalLM name them:
  model.embed_tokens, model.layers.N.*, model.norm, lm_head   the LLM, HF Llama names
  model.mm_projector.{0,2,4..}.weight|bias                      mlpNx_gelu (nn.Sequential, GELU
  model.mm_projector.weight|bias                                at odd indices) / linear
  model.vision_tower.vision_tower.vision_model.*                CLIPVisionTower's CLIPVisionModel
  model.image_newline                                           anyres ('spatial_unpad')
config.json is the Llama/Mistral config plus mm_vision_tower, mm_hidden_size, mm_projector_type,
mm_vision_select_layer, mm_vision_select_feature (patch | cls_patch), mm_patch_merge_type
(flat | spatial_unpad), image_aspect_ratio (pad | square | anyres), image_grid_pinpoints
([width, height] pairs: llava/mm_utils.py select_best_resolution unpacks them that way) and, for
S2 towers, s2 + s2_scales ("378,756,1134").
Training outputs: stage 1 saves mm_projector.bin (+ config.json) only; LoRA runs save a peft adapter
and non_lora_trainables.bin, keys under `base_model.model.`. As llava/model/builder.py does, the
rest comes from a base (--base: a Vicuna / Llama HF dir or a full LLaVA dir) and the tower from
mm_vision_tower (or --vision). `<image>` is no token there (IMAGE_TOKEN_INDEX = -200): importing
adds it to the tokenizer (convert/tokenizer.py); exports record our id as image_token_index.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

from convert import hf, peft, tensors, tokenizer, tower
from data.jsonfile import load_json
from vlm import hf as vlm_hf, tensorfile  # reading HF dirs and weight files
from vlm.config import (CLIP_VIT_L_14_336, DFN5B_CLIP_VIT_H_14_378, TilerConfig,
                        VisionConfig, VLMConfig, ConnectorConfig)
from vlm.errors import ConversionError

TOWER = "model.vision_tower.vision_tower.vision_model."
TOWER_DIR = "vision_tower"  # the exported tower, as a HF CLIPVisionModel dir mm_vision_tower names
LLAVA_TRAINABLES = "non_lora_trainables.bin"  # what a LoRA run trains besides the adapter
_PROJ = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")
# Towers named by hub id in LLaVA configs whose shapes we know (their weights must be in the
# checkpoint, or given with --vision).
KNOWN_TOWERS = {"clip-vit-large-patch14-336": CLIP_VIT_L_14_336,
                "dfn5b-clip-vit-h-14-378": DFN5B_CLIP_VIT_H_14_378}
_ASPECT = {"pad": "pad", "squash": "squash"}  # anything else center-crops in LLaVA


def canonical_name(key: str) -> Optional[tuple]:
  """(component, canonical HF name) of a LLaVA code-base key, or None."""
  key = re.sub(r"^base_model\.model\.", "", key)
  m = _PROJ.match(key)
  if m:
    i = int(m.group(1) or 0)
    return None if i % 2 else ("connector", f"linear_{i // 2 + 1}.{m.group(2)}")
  if key.startswith(TOWER):
    return vlm_hf.canonical_name("vision_model." + key[len(TOWER):])
  if key == "model.image_newline":
    return "top", "image_newline"
  canon = vlm_hf.canonical_name(key)
  return canon if canon is not None and canon[0] == "llm" else None


def name_fn(cfg: VLMConfig):
  """Canonical (component, name) -> LLaVA code-base key."""
  def name(comp, nm):
    if comp == "llm":
      return nm if nm.startswith("lm_head.") else f"model.{nm}"
    if comp == "vision":
      return TOWER + nm
    if comp == "connector":
      i, wb = re.fullmatch(r"linear_(\d+)\.(weight|bias)", nm).groups()
      if cfg.connector.kind == "linear":
        return f"model.mm_projector.{wb}"
      return f"model.mm_projector.{2 * (int(i) - 1)}.{wb}"
    return "model.image_newline"
  return name


# --- configs -------------------------------------------------------------------------------------

def is_llava_config(d: dict) -> bool:
  return "mm_vision_tower" in d or "mm_projector_type" in d or "mm_hidden_size" in d


def to_vlm(d: dict, vision: VisionConfig, *, source: str = "config.json",
           tokens: Optional[set] = None) -> VLMConfig:
  """A LLaVA code-base config.json (+ the tower's own config) -> VLMConfig; `tokens`: the
  tokenizer's token strings (vlm_hf.tokenizer_tokens), which tell Llama-2 / Llama-3 / Yi apart."""
  mt = d.get("model_type")
  if mt not in ("llava_llama", "llava_mistral", "llava"):
    raise ConversionError(f"unknown architecture model_type={mt!r} in {source} "
                          "(llava_llama | llava_mistral)")
  if d.get("mm_use_im_start_end"):
    raise ConversionError(f"{source}: mm_use_im_start_end=true checkpoints are not supported")
  llm = vlm_hf.text_config(dict(d, model_type="mistral" if mt == "llava_mistral" else "llama"))
  feature = d.get("mm_vision_select_feature", "patch")
  if feature not in ("patch", "cls_patch"):
    raise ConversionError(f"{source}: mm_vision_select_feature={feature!r} (patch | cls_patch)")
  vision = dataclasses.replace(vision, select_layer=int(d.get("mm_vision_select_layer", -2)),
                               keep_cls=feature == "cls_patch")
  kind = d.get("mm_projector_type", "linear")
  from vlm.connector import depth
  try:
    depth(kind)
  except ValueError:
    raise ConversionError(f"{source}: mm_projector_type={kind!r} (linear | mlpNx_gelu)"
                          ) from None
  aspect = str(d.get("image_aspect_ratio", "square"))
  mode = _ASPECT.get(aspect, "center_crop")
  n_scales = 1
  if d.get("s2"):
    scales = tuple(sorted(int(x) for x in str(d.get("s2_scales", "336,672,1008")).split(",")))
    if scales[0] != vision.image_size or any(s % scales[0] for s in scales):
      raise ConversionError(f"{source}: s2_scales {scales} must be multiples of the tower's "
                            f"{vision.image_size}, starting with it")
    tiler, n_scales = TilerConfig(kind="s2", scales=scales, resize_mode=mode), len(scales)
  elif aspect.startswith("anyres"):
    merge = d.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
      raise ConversionError(f"{source}: anyres with mm_patch_merge_type={merge!r} is not "
                            "supported (spatial_unpad)")
    pins = tuple((int(h), int(w)) for w, h in d["image_grid_pinpoints"])
    tiler = TilerConfig(kind="anyres", grid_pinpoints=pins)
  else:
    tiler = TilerConfig(kind="single", resize_mode=mode)
  want = vision.width * n_scales
  if d.get("mm_hidden_size", want) != want:
    raise ConversionError(f"{source}: mm_hidden_size {d['mm_hidden_size']} != tower width "
                          f"{vision.width} x {n_scales} scale(s)")
  # LlavaMistralForCausalLM (LLaVA-Med v1.5) trained in the code base's conv_mistral_instruct
  text = dict(d, model_type="mistral" if mt == "llava_mistral" else "llama")
  template = vlm_hf.template_for(text, tokens, vlm=True, source=source)
  fmt = vlm_hf.llava_next_format(template) if tiler.kind == "anyres" else {}
  return VLMConfig(llm=llm, vision=vision, tiler=tiler, connector=ConnectorConfig(kind),
                   template=template,
                   image_token_id=int(d.get("image_token_index", -1)), **fmt)


def from_vlm(cfg: VLMConfig, tower_path: str, dtype: str) -> dict:
  """VLMConfig -> a LLaVA code-base config.json (transformers 4 style rope keys, as the code base
  pins transformers 4.3x)."""
  text = hf.hf_config(cfg.replace(vision=None))
  rope = text.pop("rope_parameters")
  text["rope_theta"] = rope.pop("rope_theta")
  text["rope_scaling"] = None if rope["rope_type"] == "default" else rope
  mistral = cfg.template in ("mistral_instruct", "llava_mistral") or bool(cfg.llm.sliding_window)
  v, t = cfg.vision, cfg.tiler
  aspect = {"pad": "pad", "squash": "squash", "center_crop": "square"}[t.resize_mode]
  d = dict(text, architectures=["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
           model_type="llava_mistral" if mistral else "llava_llama", torch_dtype=dtype,
           mm_vision_tower=tower_path, mm_hidden_size=cfg.feature_dim,
           mm_projector_type=cfg.connector.kind, mm_vision_select_layer=v.select_layer,
           mm_vision_select_feature="cls_patch" if v.keep_cls else "patch",
           mm_patch_merge_type="flat", image_aspect_ratio=aspect, mm_use_im_start_end=False,
           mm_use_im_patch_token=False, use_mm_proj=True, tune_mm_mlp_adapter=False,
           freeze_mm_mlp_adapter=False, tokenizer_padding_side="right",
           image_token_index=cfg.image_token_id)  # ours; the code base splices at -200
  if t.kind == "s2":
    d.update(s2=True, s2_scales=",".join(str(s) for s in t.scales))
  elif t.kind == "anyres":
    d.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
             image_grid_pinpoints=[[w, h] for h, w in t.grid_pinpoints])
  return d


# --- import --------------------------------------------------------------------------------------

def _read_config(path) -> Optional[dict]:
  f = os.path.join(path, "config.json")
  if not os.path.exists(f):
    return None
  d = load_json(f)
  return d if is_llava_config(d) else None


def _tower(d: dict, src_dir: str, vision: Optional[str], source: str):
  """The tower's config and (maybe) weights: --vision, else the exported vision_tower/ beside the
  checkpoint, else mm_vision_tower when it is a local dir, else a known hub id (shapes only)."""
  name = d.get("mm_vision_tower", "")
  for path in (vision, os.path.join(src_dir, TOWER_DIR), name):
    if path and os.path.isdir(path):
      return tower.load(path)
  key = os.path.basename(str(name).rstrip("/")).lower()
  if key in KNOWN_TOWERS:
    return KNOWN_TOWERS[key], {}
  raise ConversionError(f"{source}: cannot find the vision tower mm_vision_tower={name!r}; "
                        "pass --vision DIR (a HF CLIP or open_clip dir)")


def load(src, *, base: Optional[str] = None, vision: Optional[str] = None, dtype=None):
  """A LLaVA code-base checkpoint -> (VLMConfig, numpy params, tokenizer dir or None).

  `src`: a full checkpoint dir, a stage-1 dir (or its lone mm_projector.bin) or a LoRA output dir.
  Weights are layered, later wins: --base, the dir's model weights, mm_projector.bin,
  non_lora_trainables, the adapter; the tower's weights fill in what the checkpoint lacks."""
  src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  d = _read_config(src_dir) or (_read_config(base) if base else None)
  if d is None:
    raise ConversionError(f"no LLaVA config.json (mm_* keys) in {src_dir}"
                          + (f" or {base}" if base else ""))
  groups = []  # [(files)] in overlay order
  if base:
    files = tensorfile.find_weights(base)
    if not files:
      raise ConversionError(f"no model weights in --base {base}")
    groups.append(files)
  if os.path.isfile(src):
    groups.append([src])
  else:
    for stems in (("model", "pytorch_model"), ("mm_projector",), ("non_lora_trainables",),
                  ("adapter_model",)):
      files = tensorfile.find_weights(src_dir, stems)
      if files:
        groups.append(files)
  if len(groups) == (1 if base else 0):
    raise ConversionError(f"no weights in {src} (model*, mm_projector, non_lora_trainables, "
                          "adapter_model)")
  merged = {}
  for files in groups:
    merged.update(tensorfile.canonicalize(tensorfile.read_files(files), canonical_name,
                                          source=", ".join(files)))
  vcfg, vt = _tower(d, src_dir, vision, src)
  if not any(k[0] == "vision" for k in merged) and not vt:
    raise ConversionError(f"no vision tower weights in {src} and mm_vision_tower="
                          f"{d.get('mm_vision_tower')!r} is not a local dir: pass --vision DIR")
  for k, t in vt.items():
    merged.setdefault(k, t)
  tok = next((p for p in (src_dir, base) if tokenizer.has_tokenizer(p)), None)
  cfg = to_vlm(d, vcfg, source=os.path.join(src_dir, "config.json"),
               tokens=vlm_hf.tokenizer_tokens(tok) if tok else None)
  if any(k[1].endswith((".lora_A.weight", ".lora_B.weight")) for k in merged):
    conf, where = peft.read_config(src_dir)  # LoRA weights need their adapter_config.json
    cfg = peft.adapt(cfg, conf, merged, source=where)
  if cfg.llm.tie_embeddings:
    merged.pop(("llm", "lm_head.weight"), None)
  params = vlm_hf.import_weights(cfg, merged, source=src, dtype=dtype)
  return cfg, params, tok


# --- export --------------------------------------------------------------------------------------

def save(cfg: VLMConfig, params: dict, dst, *, max_shard_bytes: int, dtype=None) -> list:
  """Write the LLaVA code-base layout into dst, with the tower also as a HF CLIPVisionModel dir
  (dst/vision_tower, which mm_vision_tower names: the code base loads its tower from there)."""
  if cfg.vision is None:
    raise ConversionError("--to llava needs a vision model; use --to hf for a text-only LLM")
  dst = os.path.abspath(dst)
  files = tensors.write_weights(hf.iter_export(cfg, params, name_fn(cfg)), dst, dtype=dtype,
                                max_shard_bytes=max_shard_bytes)
  dname = str(dtype or _dtype_name(params))
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(from_vlm(cfg, os.path.join(dst, TOWER_DIR), dname), f, indent=2)
  tdir = os.path.join(dst, TOWER_DIR)
  files += tensors.write_weights(
      hf.iter_export(cfg, {"vision": params["vision"]}, lambda comp, nm: "vision_model." + nm),
      tdir, dtype=dtype, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(tdir, "config.json"), "w") as f:
    json.dump(dict(hf.vision_hf_config(cfg.vision), architectures=["CLIPVisionModel"],
                   torch_dtype=dname), f, indent=2)
  with open(os.path.join(tdir, "preprocessor_config.json"), "w") as f:
    json.dump(hf.preprocessor_config(cfg.replace(tiler=TilerConfig())), f, indent=2)
  return files


def save_adapter(cfg: VLMConfig, params: dict, dst, *, base: str = None, dtype=None) -> list:
  """`--to peft --names llava`: what the LLaVA code base's LoRA training writes for
  LlavaLlamaForCausalLM (over the `--to llava --lora base` export): the peft adapter with keys
  under `model.layers.*`, the connector in non_lora_trainables.bin as `base_model.model.model.
  mm_projector.*` (llava/model/builder.py reads that file, then the adapter), and config.json
  when `base` is a LLaVA dir naming its tower."""
  if cfg.lora.rank and cfg.vision is None:
    raise ConversionError("--names llava needs a vision model (LLaVA's LlavaLlamaForCausalLM)")
  files = peft.save(cfg, params, dst, base=base, dtype=dtype, names=name_fn(cfg))
  import torch
  key = peft.key_fn(name_fn(cfg))
  out = {k: _to_torch(v if dtype is None else tensorfile.cast(v, dtype, k))
         for k, v in hf.iter_export(cfg, peft.split(params)[1], key)}
  if out:
    torch.save(out, os.path.join(dst, LLAVA_TRAINABLES))
    files.append(os.path.join(dst, LLAVA_TRAINABLES))
  d = _read_config(base) if base and os.path.isdir(base) else None
  if d is not None:  # llava/model/builder.py reads the LoRA dir's config.json
    dname = str(dtype or _dtype_name(params))
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(from_vlm(cfg, d["mm_vision_tower"], dname), f, indent=2)
    files.append(os.path.join(dst, "config.json"))
  return files


def _to_torch(x):
  import numpy as np
  import torch
  x = np.array(x)  # a writable copy, as torch wants
  if x.dtype == tensorfile.DTYPES["bfloat16"]:
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def _dtype_name(params) -> str:
  import numpy as np
  return str(np.asarray(params["llm"]["embed"]).dtype)
