"""peft LoRA adapters <-> the LoRA params of this project.

Reading: adapter_config.json gives rank, alpha and dropout (rsLoRA, DoRA and per-module ranks are
refused: our Dense has one scale); which projections carry adapters is read off the lora_A keys.
Writing: adapter_config.json + adapter_model.safetensors keyed as peft saves a LoRA on the exported
transformers model (`base_model.model.` + module path, no adapter name), so
`PeftModel.from_pretrained(base, dir)` loads it on the `--to hf --lora base` export; beside it
non_lora_trainables.safetensors holds the trainable connector (and anyres image_newline) under the
same model's module names, for `base.load_state_dict(load_file(...), strict=False)` first.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from convert import hf, tensors
from vlm.config import LoraConfig, VLMConfig

ADAPTER_CONFIG = "adapter_config.json"
TRAINABLES = "non_lora_trainables.safetensors"
_LLM = {v: k for k, v in hf.LLM_PROJ.items()}
_VISION = {v: k for k, v in hf.VISION_PROJ.items()}
_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2")


def lora_config(d: dict, keys, *, source: str) -> LoraConfig:
  """adapter_config.json + the canonical (component, name) keys of the adapter -> LoraConfig."""
  if d.get("peft_type", "LORA") != "LORA":
    raise hf.ConversionError(f"{source}: peft_type {d.get('peft_type')!r} is not LORA")
  for flag in ("use_rslora", "use_dora"):
    if d.get(flag):
      raise hf.ConversionError(f"{source}: {flag}=true is not supported")
  for pat in ("rank_pattern", "alpha_pattern"):
    if d.get(pat):
      raise hf.ConversionError(f"{source}: per-module {pat} is not supported")
  if d.get("bias", "none") != "none":
    raise hf.ConversionError(f"{source}: bias={d['bias']!r} adapters are not supported (none)")
  found = {"llm": set(), "vision": set()}
  for comp, name in keys:
    m = re.fullmatch(r"(?:encoder\.)?layers\.\d+\.(.+)\.lora_A\.weight", name)
    if m and comp in found:
      ours = (_LLM if comp == "llm" else _VISION).get(m.group(1))
      if ours:
        found[comp].add(ours)
  if not found["llm"] and not found["vision"]:
    raise hf.ConversionError(f"{source}: no lora_A weights found")
  order = lambda s: tuple(sorted(s, key=_ORDER.index))
  return LoraConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]),
                    dropout=float(d.get("lora_dropout", 0.0)), targets=order(found["llm"]),
                    vision_targets=order(found["vision"]))


def _modules(cfg: VLMConfig) -> dict:
  """Module path prefix of each component in the transformers model `--to hf` writes."""
  if cfg.vision is None:
    return {"llm": "model."}
  return {"llm": "model.language_model.", "vision": "model.vision_tower.",
          "connector": "model.multi_modal_projector.", "top": "model."}


def _target_modules(cfg: VLMConfig):
  """A plain list for text-only models; a regex for VLMs, so that `q_proj` does not also catch
  the CLIP tower's q_proj (peft fullmatches a string against each module name)."""
  names = [hf.LLM_PROJ[t].split(".")[-1] for t in cfg.lora.targets]
  if cfg.vision is None:
    return sorted(names)
  alts = [re.escape("model.language_model.layers.") + r"\d+\." + re.escape(hf.LLM_PROJ[t])
          for t in cfg.lora.targets]
  alts += [re.escape("model.vision_tower.encoder.layers.") + r"\d+\." + re.escape(hf.VISION_PROJ[t])
           for t in cfg.lora.vision_targets]
  return "|".join(f"(?:{a})" for a in alts)


def save(cfg: VLMConfig, params: dict, dst, *, base: str = None, dtype=None) -> list:
  """Write the adapter (and the trainable connector) of `params` into dst; returns the files."""
  if not cfg.lora.rank:
    raise hf.ConversionError("this checkpoint has no LoRA adapters (lora.rank = 0)")
  os.makedirs(dst, exist_ok=True)
  flat = flatten_dict(params)
  adapters = unflatten_dict({k: v for k, v in flat.items() if k[-1] in ("lora_a", "lora_b")})
  prefix = _modules(cfg)
  name = lambda comp, nm: f"base_model.model.{prefix[comp]}{nm}"
  files = tensors.write_weights(hf.iter_export(cfg, adapters, name), dst, dtype=dtype,
                                max_shard_bytes=2**62, stem="adapter_model")
  conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank,
          "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
          "target_modules": _target_modules(cfg), "bias": "none", "fan_in_fan_out": False,
          "inference_mode": True, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": base}
  with open(os.path.join(dst, ADAPTER_CONFIG), "w") as f:
    json.dump(conf, f, indent=2)
  files.append(os.path.join(dst, ADAPTER_CONFIG))
  rest = {k: v for k, v in flat.items() if k[0] in ("connector", "image_newline")}
  if rest:
    from safetensors.numpy import save_file
    out = dict(hf.iter_export(cfg, unflatten_dict(rest), lambda comp, nm: prefix[comp] + nm))
    if dtype is not None:
      out = {k: tensors.cast(v, dtype, k) for k, v in out.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.path.join(dst, TRAINABLES),
              metadata={"format": "pt"})
    files.append(os.path.join(dst, TRAINABLES))
  return files
