"""`python -m convert import|export|merge-lora`: PyTorch checkpoints in and out of this project.

Tensors are read one at a time and written as they are converted; the one full copy in memory is
the parameter tree written to (or read from) the orbax checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from convert import hf, tensors, tokenizer
from data.errors import cli_errors
from vlm import hf as vlm_hf, tensorfile  # reading HF dirs and weight files
from vlm.errors import ConversionError

EPILOG = """examples:
  python -m convert import --from hf ~/llava-1.5-7b-hf --out ckpt/llava15 --dtype bfloat16
  python -m convert import --from open_clip ~/DFN5B-CLIP-ViT-H-14-378 --out ckpt/dfn5b
  python -m convert import --from llava ~/llava-med-v1.5-mistral-7b --out ckpt/llava_med
  python -m convert import --from llava ~/run/llava-lora --base ~/llava-v1.5-13b --out ckpt/ldrt
  python -m convert import --from peft ~/run/adapter --base ~/llava-1.5-13b-hf --out ckpt/ldrt
  python -m convert import --from llava ~/stage1/mm_projector.bin --base ~/Llama-3-8B-Instruct \\
      --vision ~/DFN5B-CLIP-ViT-H-14-378 --out ckpt/stage1
  python -m convert import --llm ~/Meta-Llama-3-8B-Instruct --vision ~/DFN5B-CLIP-ViT-H-14-378 \\
      --preset llama3_med --out ckpt/llama3_med --seed 0
  python -m convert export --to hf ckpt/llava15 --out hf/llava15 --max-shard-size 5GB
  python -m convert export --to llava ckpt/llama3_med --out llava/llama3_med
  python -m convert export --to hf ckpt/ldrt --lora base --out hf/ldrt_base
  python -m convert export --to peft ckpt/ldrt --out hf/ldrt_adapter --base ~/llava-1.5-13b-hf
  python -m convert export --to peft ckpt/ldrt --names llava --base llava/ldrt_base --out llava/lora
  python -m convert merge-lora ckpt/ldrt --out ckpt/ldrt_merged
"""


def _log(msg):
  print(msg, file=sys.stderr)


def _scales(s):
  return tuple(int(x) for x in s.split(",")) if s else None


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert", description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)

  imp = sub.add_parser("import", help="a PyTorch checkpoint -> this project's checkpoint dir",
                       description="Write config.json + params/ (orbax) + tokenizer/. Either "
                       "--from KIND SRC, or the composition --llm DIR --vision DIR --preset NAME.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  imp.add_argument("src", nargs="?",
                   help="source dir (or a lone mm_projector.bin for --from llava)")
  imp.add_argument("--from", dest="kind", choices=("hf", "open_clip", "llava", "peft"),
                   help="hf: Llama / Mistral / Llava / LlavaNext dir; open_clip: a CLIP tower "
                   "(open_clip_config.json + weights) -> a tower-only checkpoint; llava: the "
                   "LLaVA / LLaVA-Med code base (full, stage-1 projector, or LoRA output); "
                   "peft: a transformers + peft LoRA adapter dir (needs --base)")
  imp.add_argument("--out", required=True, help="checkpoint dir to write")
  imp.add_argument("--dtype", choices=tuple(tensorfile.DTYPES),
                   help="cast weights (default: keep the stored dtype); float32 values beyond "
                   "the target's range are an error")
  imp.add_argument("--base", help="llava: base weights for stage-1 / LoRA outputs (HF Llama dir "
                   "or full LLaVA dir), as LLaVA's --model-base; peft: the HF dir the adapter "
                   "was trained on (default: its base_model_name_or_path)")
  imp.add_argument("--vision", help="llava: the tower when the checkpoint lacks it / composition: "
                   "the tower (open_clip dir, HF CLIP dir or a tower checkpoint)")
  imp.add_argument("--llm", help="composition: HF Llama / Mistral dir (with its tokenizer)")
  imp.add_argument("--connector", help="composition: stage-1 projector (mm_projector.bin or "
                   "safetensors) instead of a fresh connector")
  imp.add_argument("--preset", help="composition: layout preset (e.g. llama3_med)")
  imp.add_argument("--seed", type=int, default=0, help="composition: seed of the new connector")
  imp.add_argument("--s2-scales", type=_scales, help="composition: override the preset's S2 "
                   "scales, e.g. 378,756,1134")
  imp.add_argument("--select-layer", type=int, default=-2,
                   help="open_clip: hidden state the tower returns (default -2)")

  exp = sub.add_parser("export", help="this project's checkpoint -> a PyTorch layout",
                       description="hf: transformers Llama / Mistral / Llava / LlavaNext dir "
                       "(S2 models have no transformers class: use llava). llava: the LLaVA "
                       "code-base layout with mm_* / s2 config keys; the tower is also written "
                       "as DST/vision_tower (a HF CLIPVisionModel dir) and mm_vision_tower names "
                       "its absolute path. peft: adapter_config.json + adapter_model.safetensors "
                       "with the trained connector as a modules_to_save module, for "
                       "one PeftModel.from_pretrained on the original HF base (or the `--to hf "
                       "--lora base` export); --names llava: the LLaVA code-base LoRA layout "
                       "(connector in non_lora_trainables.bin).")
  exp.add_argument("ckpt", help="checkpoint dir of this project")
  exp.add_argument("--to", dest="kind", required=True, choices=("hf", "llava", "peft"))
  exp.add_argument("--out", required=True, help="directory to write")
  exp.add_argument("--dtype", choices=tuple(tensorfile.DTYPES), help="cast on export")
  exp.add_argument("--max-shard-size", default="5GB",
                   help="split weights into shards of at most this size (+ index json)")
  exp.add_argument("--lora", choices=("merge", "base"),
                   help="checkpoints with LoRA (hf / llava): merge = fold adapters into the "
                   "weights; base = base weights only (adapters go out with --to peft)")
  exp.add_argument("--names", choices=("hf", "llava"), default="hf",
                   help="peft: module names of the base the adapter is for: hf = the "
                   "transformers model; llava = LLaVA's LlavaLlamaForCausalLM (`--to llava "
                   "--lora base`)")
  exp.add_argument("--base", help="peft: the base dir, recorded as base_model_name_or_path; "
                   "with --names llava its config.json (mm_vision_tower) is written beside")

  mrg = sub.add_parser("merge-lora", help="fold LoRA adapters into the base weights")
  mrg.add_argument("ckpt", help="checkpoint dir with LoRA adapters")
  mrg.add_argument("--out", required=True, help="checkpoint dir to write")
  return p


# --- checkpoints ---------------------------------------------------------------------------------

def _write_ckpt(out, cfg, params, tok_src=None, image_token=False):
  """Save config + params (+ tokenizer; `image_token` gives the model an <image> id), in the
  layout of vlm.checkpoint (config.json, params/, tokenizer/)."""
  os.makedirs(out, exist_ok=True)
  tok_dir = os.path.join(out, "tokenizer")
  has_tok = tokenizer.copy(tok_src, tok_dir) if tok_src else False
  if tok_src and not has_tok:
    _log(f"note: no tokenizer files in {tok_src}")
  if image_token:
    params, cfg = tokenizer.ensure_image_token(tok_dir if has_tok else None, params, cfg, _log)
  import jax
  from vlm import checkpoint
  params = jax.tree_util.tree_map(np.asarray, params)  # host arrays: the lean, copy-free save path
  checkpoint.save(out, cfg, params)
  n = sum(np.asarray(x).nbytes for x in _leaves(params))
  print(f"wrote {out} ({n / 1e6:.1f} MB of params)")
  return cfg


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def _load_ckpt(path):
  from vlm import checkpoint
  if not checkpoint.looks_like_checkpoint(path):   # a damaged one is said as such by load
    raise ConversionError(f"{path} is not a checkpoint of this project (config.json + params/)")
  cfg, params = checkpoint.load(path)
  params = _mutable(params)
  tok = os.path.join(path, "tokenizer")
  return cfg, params, tok if tokenizer.has_tokenizer(tok) else None


def _mutable(tree):
  return {k: _mutable(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _lora_dense(params):
  """The dicts of every Dense carrying an adapter (kernel, lora_a, lora_b)."""
  from vlm import lora
  for path in lora.lora_paths(params):
    node = params
    for k in path:
      node = node[k]
    yield node


def merge_lora(cfg, params):
  """Fold every adapter into its kernel in place, one Dense at a time (no second model copy)."""
  from vlm import lora
  from vlm.config import LoraConfig
  for node in _lora_dense(params):
    merged = lora.merge({k: node[k] for k in ("kernel", "lora_a", "lora_b")}, cfg.lora.scale)
    node["kernel"] = np.asarray(merged["kernel"])
    del node["lora_a"], node["lora_b"]
  return cfg.replace(lora=LoraConfig()), params


def _drop_lora(cfg, params):
  from vlm.config import LoraConfig
  for node in _lora_dense(params):
    del node["lora_a"], node["lora_b"]
  return cfg.replace(lora=LoraConfig()), params


# --- commands ------------------------------------------------------------------------------------

def cmd_import(a):
  dt = tensorfile.dtype_of(a.dtype)
  if a.llm or a.preset:
    if a.kind or a.src:
      raise ConversionError("use either --from KIND SRC or --llm/--vision/--preset, not both")
    if not (a.llm and a.vision and a.preset):
      raise ConversionError("composition needs --llm DIR --vision DIR --preset NAME")
    from convert import compose
    cfg, params = compose.compose(a.llm, a.vision, a.preset, connector=a.connector, seed=a.seed,
                                  dtype=dt, s2_scales=a.s2_scales, log=_log)
    _write_ckpt(a.out, cfg, params, a.llm, image_token=True)
    return
  if not (a.kind and a.src):
    raise ConversionError("import needs --from KIND SRC (or --llm/--vision/--preset)")
  if not os.path.exists(a.src):
    raise ConversionError(f"no such file or directory: {a.src}")
  if a.kind == "hf":
    cfg, params = vlm_hf.load_dir(a.src, dtype=dt)
    _write_ckpt(a.out, cfg, params, a.src)
  elif a.kind == "open_clip":
    from convert import tower
    from vlm.config import VLMConfig
    if not tower.is_open_clip(a.src):
      raise ConversionError(f"no open_clip_config.json in {a.src}")
    vcfg, vt = tower.load(a.src, select_layer=a.select_layer)
    cfg = VLMConfig(vision=vcfg)
    params = vlm_hf.import_weights(cfg, vt, source=a.src, dtype=dt, components=("vision",))
    _write_ckpt(a.out, cfg, params)
    _log("note: a tower-only checkpoint (params/vision); use it as --vision in a composition")
  elif a.kind == "peft":
    from convert import peft
    cfg, params, tok = peft.load(a.src, base=a.base, dtype=dt)
    _write_ckpt(a.out, cfg, params, tok)
  else:
    from convert import llava
    cfg, params, tok = llava.load(a.src, base=a.base, vision=a.vision, dtype=dt)
    _write_ckpt(a.out, cfg, params, tok, image_token=True)


def cmd_export(a):
  if a.kind != "peft" and (a.names != "hf" or a.base):
    raise ConversionError("--names and --base apply to --to peft only")
  cfg, params, tok = _load_ckpt(a.ckpt)
  dt = tensorfile.dtype_of(a.dtype)
  shard = tensors.parse_size(a.max_shard_size)
  if a.kind == "peft":
    if a.names == "llava":
      from convert import llava
      files = llava.save_adapter(cfg, params, a.out, base=a.base, dtype=dt)
    else:
      from convert import peft
      files = peft.save(cfg, params, a.out, base=a.base, dtype=dt)
    print(f"wrote {len(files)} files to {a.out}")
    return
  if cfg.lora.rank:
    if a.lora is None:
      raise ConversionError(f"{a.ckpt} has LoRA adapters (rank {cfg.lora.rank}): pass --lora merge "
                            "(fold them into the weights) or --lora base (base weights only; "
                            "write the adapters with --to peft)")
    cfg, params = (merge_lora if a.lora == "merge" else _drop_lora)(cfg, params)
  if cfg.vision is not None and set(params) == {"vision"}:
    raise ConversionError(f"{a.ckpt} is a tower-only checkpoint: compose it into a VLM first")
  if a.kind == "hf":
    conf = hf.hf_config(cfg)  # refuses S2 before anything is written
    files = tensors.write_weights(hf.iter_export(cfg, params, hf.hf_name(cfg)), a.out,
                                  max_shard_bytes=shard, dtype=dt)
    conf["dtype"] = str(dt or np.asarray(params["llm"]["embed"]).dtype)
    with open(os.path.join(a.out, "config.json"), "w") as f:
      json.dump(conf, f, indent=2)
    if cfg.vision is not None:
      with open(os.path.join(a.out, "preprocessor_config.json"), "w") as f:
        json.dump(hf.preprocessor_config(cfg), f, indent=2)
  else:
    from convert import llava
    files = llava.save(cfg, params, a.out, max_shard_bytes=shard, dtype=dt)
  if tok is None:
    _log(f"note: {a.ckpt} has no tokenizer/")
  else:
    tokenizer.copy(tok, a.out)
  print(f"wrote {len(files)} weight files to {a.out}")


def cmd_merge(a):
  cfg, params, tok = _load_ckpt(a.ckpt)
  if not cfg.lora.rank:
    raise ConversionError(f"{a.ckpt} has no LoRA adapters (lora.rank = 0)")
  cfg, params = merge_lora(cfg, params)
  _write_ckpt(a.out, cfg, params, tok)


def main(argv=None):
  args = parser().parse_args(argv)
  with cli_errors():
    {"import": cmd_import, "export": cmd_export, "merge-lora": cmd_merge}[args.cmd](args)
