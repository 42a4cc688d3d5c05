"""peft LoRA adapters <-> the LoRA params of this project.

Reading (`--from peft ADAPTER --base HF_DIR`, and the adapters of LLaVA LoRA outputs): the adapter
is layered over the base: lora_A/lora_B keys become our adapters, every other key (peft's
modules_to_save copies: connector, lm_head, embed_tokens, ...; a plain image_newline) replaces the
base's weight. adapter_config.json gives r / lora_alpha, rank_pattern / alpha_pattern and
use_rslora, resolved per module as peft's LoRA model resolves them. Our Dense has one rank and one
scale per model, so each adapter is brought to them exactly: zero rows / columns pad a lower rank,
the module's scale over the model's is folded into lora_B, a layer without an adapter gets zeros
(B @ A unchanged in every case). Options that change the computation otherwise are refused.

Writing (`--to peft`): adapter_config.json + adapter_model.safetensors keyed as peft's
save_pretrained writes them (`base_model.model.` + module path, no adapter name; a
modules_to_save module under its own path). names="hf": modules of the transformers model (the
original HF base, or the `--to hf --lora base` export); the trained connector is a
modules_to_save module (multi_modal_projector) and anyres' image_newline a plain key, so one
`PeftModel.from_pretrained(base, dir)` gives our model. names="llava" (convert/llava.py
save_adapter, over this writer): what the LLaVA code base's LoRA training writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from convert import hf, tensors, tokenizer
from vlm import hf as vlm_hf, tensorfile  # reading HF dirs and weight files
from vlm.config import LoraConfig, VLMConfig
from vlm.errors import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_STEM = "adapter_model"
_LAYERS = {"llm": "layers.", "vision": "encoder.layers."}
_LORA = re.compile(r"((?:encoder\.)?layers\.(\d+)\.(.+))\.lora_([AB])\.weight")
# adapter_config.json options that change what the adapter computes beyond B @ A * scale
_REFUSED = ("use_dora", "lora_bias", "trainable_token_indices", "layer_replication",
            "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
            "megatron_config")
# init_lora_weights that also rewrite the base weights: the adapter is meaningless without them
_BASE_REWRITING = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check(d: dict, source: str):
  if d.get("peft_type", "LORA") != "LORA":
    raise ConversionError(f"{source}: peft_type {d.get('peft_type')!r} is not LORA")
  for opt in _REFUSED:
    if d.get(opt):
      raise ConversionError(f"{source}: {opt}={d[opt]!r} is not supported")
  if d.get("bias", "none") != "none":
    raise ConversionError(f"{source}: bias={d['bias']!r} adapters are not supported (none)")
  init = str(d.get("init_lora_weights", True)).lower()
  if init.startswith(_BASE_REWRITING):
    raise ConversionError(f"{source}: init_lora_weights={init!r} rewrites the base weights; "
                          "save the adapter with path_initial_model_for_weight_conversion")


def _pattern(patterns: dict, module: str, default):
  """peft's get_pattern_key: the first pattern that fullmatches a dotted suffix of the module."""
  for key in patterns or {}:
    if re.match(rf"(.*\.)?({key})$", module):
      return patterns[key]
  return default


def _module(t, canon: str) -> str:
  """The module path peft matched patterns against (the saved key less wrapper and suffix)."""
  key = getattr(t, "key", canon)
  key = re.sub(r"^base_model\.model\.", "", key)
  return re.sub(r"\.lora_[AB](?:\.[^.]+)?\.weight$", "", key)


def _padded(t, rank: int, axis: int, factor: float):
  """A Lazy of `t` zero-padded to `rank` on `axis` and multiplied by `factor` (float32)."""
  shape = list(t.shape)
  shape[axis] = rank

  def read():
    x = np.asarray(t() if callable(t) else t)
    if factor != 1.0:
      x = x.astype(np.float32) * np.float32(factor)
    if x.shape[axis] == rank:
      return x
    out = np.zeros(shape, x.dtype)
    out[(slice(None),) * axis + (slice(0, x.shape[axis]),)] = x
    return out
  dt = np.float32 if factor != 1.0 else getattr(t, "dtype", None)
  return tensorfile.Lazy(getattr(t, "file", "<adapter>"), getattr(t, "key", "<adapter>"), shape, dt,
                         read)


def adapt(cfg: VLMConfig, d: dict, tensors_: dict, *, source: str) -> VLMConfig:
  """Bring the LoRA entries of `tensors_` ({(component, canonical): tensor}, changed in place) to
  one rank and scale; returns cfg with the LoraConfig that does so."""
  _check(d, source)
  r0, a0, rs = int(d["r"]), float(d["lora_alpha"]), bool(d.get("use_rslora"))
  scale = lambda r, a: a / (math.sqrt(r) if rs else r)  # peft LoraLayer.update_layer
  found = {}  # (comp, layer, proj) -> (canon prefix, rank, module scale)
  by_hf = {comp: {v: k for k, v in t.items()} for comp, t in vlm_hf.projections(cfg).items()}
  for (comp, name), t in list(tensors_.items()):
    if ".lora_" not in name:
      continue
    m = _LORA.fullmatch(name)
    if not m or comp not in by_hf or m.group(3) not in by_hf[comp] or (
        comp == "vision") != name.startswith("encoder."):
      raise ConversionError(f"{source}: LoRA on {getattr(t, 'key', name)} is not supported "
                            "(LLM q,k,v,o,gate,up,down; tower q,k,v,o,fc1,fc2)")
    if m.group(4) == "B":
      continue
    module = _module(t, name)
    r = int(_pattern(d.get("rank_pattern"), module, r0))
    a = float(_pattern(d.get("alpha_pattern"), module, a0))
    if t.shape[0] != r:
      raise ConversionError(f"{getattr(t, 'key', name)}: rank {t.shape[0]} but "
                            f"{source} gives r={r} for {module}")
    if (comp, m.group(1) + ".lora_B.weight") not in tensors_:
      raise ConversionError(f"{source}: {getattr(t, 'key', name)} has no lora_B")
    found[(comp, int(m.group(2)), m.group(3))] = (m.group(1), r, scale(r, a))
  if not found:
    raise ConversionError(f"{source}: no lora_A weights found")
  rank = max(r for _, r, _ in found.values())
  alpha = a0 if rank == r0 and not rs else scale(r0, a0) * rank  # our scale = alpha / rank
  ours = alpha / rank
  for (comp, _, _), (prefix, r, s) in found.items():
    ka, kb = (comp, prefix + ".lora_A.weight"), (comp, prefix + ".lora_B.weight")
    factor = s / ours if not math.isclose(s, ours, rel_tol=1e-12) else 1.0
    if r != rank or factor != 1.0:
      tensors_[ka] = _padded(tensors_[ka], rank, 0, 1.0)
      tensors_[kb] = _padded(tensors_[kb], rank, 1, factor)
  targets = {}
  for comp, layer, proj in found:
    targets.setdefault((comp, proj), set()).add(layer)
  for (comp, proj), layers in targets.items():  # layers left out (layers_to_transform, a regex)
    n = cfg.llm.layers if comp == "llm" else cfg.vision.layers
    prefix = found[(comp, min(layers), proj)][0]
    a, b = tensors_[(comp, prefix + ".lora_A.weight")], tensors_[(comp, prefix + ".lora_B.weight")]
    for i in set(range(n)) - layers:
      at = f"{_LAYERS[comp]}{i}.{proj}"
      tensors_[(comp, at + ".lora_A.weight")] = np.zeros((rank, a.shape[1]), np.float32)
      tensors_[(comp, at + ".lora_B.weight")] = np.zeros((b.shape[0], rank), np.float32)
  pick = lambda comp: tuple(sorted({by_hf[comp][p] for c, p in targets if c == comp},
                                   key=list(by_hf.get(comp, {}).values()).index))
  return cfg.replace(lora=LoraConfig(rank=rank, alpha=alpha,
                                     dropout=float(d.get("lora_dropout", 0.0)),
                                     targets=pick("llm"), vision_targets=pick("vision")))


def read_config(src_dir: str) -> tuple:
  path = os.path.join(src_dir, ADAPTER_CONFIG)
  if not os.path.exists(path):
    raise ConversionError(f"no {ADAPTER_CONFIG} in {src_dir} (it gives the adapters' rank "
                          "and alpha)")
  with open(path) as f:
    return json.load(f), path


def load(src, *, base=None, dtype=None):
  """A peft LoRA adapter dir + the HF dir it was trained on -> (VLMConfig, params, tokenizer dir).
  `base` defaults to the adapter's base_model_name_or_path when that is a local dir."""
  if not os.path.isdir(src):
    raise ConversionError(f"--from peft needs an adapter dir ({ADAPTER_CONFIG} + "
                          f"{ADAPTER_STEM}.safetensors), not {src}")
  d, conf = read_config(src)
  base = base or d.get("base_model_name_or_path")
  if not base or not os.path.isdir(base):
    raise ConversionError(f"--from peft needs --base HF_DIR (the model {src} was trained on)")
  files = tensorfile.find_weights(src, (ADAPTER_STEM,))
  if not files:
    raise ConversionError(f"no {ADAPTER_STEM}.safetensors (or .bin) in {src}")
  cfg = vlm_hf.dir_config(base)
  merged = vlm_hf.dir_tensors(base, cfg)
  adapter = vlm_hf.lazy_tensors(files)
  head, embed = ("llm", "lm_head.weight"), ("llm", "embed_tokens.weight")
  if cfg.llm.tie_embeddings and (head in adapter or embed in adapter):
    # a modules_to_save copy of one of the tied pair unties them (the other keeps the base's)
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, tie_embeddings=False))
    merged[head] = merged[embed]
  merged.update(adapter)
  cfg = adapt(cfg, d, merged, source=conf)
  params = vlm_hf.import_weights(cfg, merged, source=f"{src} over {base}", dtype=dtype)
  tok = next((p for p in (src, base) if tokenizer.has_tokenizer(p)), None)
  return cfg, params, tok


# --- writing -------------------------------------------------------------------------------------

def _hf_modules(cfg: VLMConfig):
  """Canonical (component, name) -> module path in the transformers model `--to hf` writes."""
  if cfg.vision is None:
    return hf.hf_name(cfg)
  prefix = {"llm": "model.language_model.", "vision": "model.vision_tower.",
            "connector": "model.multi_modal_projector.", "top": "model."}
  return lambda comp, nm: nm if nm.startswith("lm_head.") else prefix[comp] + nm


def _target_modules(cfg: VLMConfig, path, plain: bool):
  """A plain list of names for text-only models; else a regex over full module paths, so that
  `q_proj` does not also catch the CLIP tower's q_proj (peft fullmatches a string)."""
  if plain:
    return sorted(vlm_hf.projections(cfg)["llm"][t].split(".")[-1] for t in cfg.lora.targets)
  alts = []
  proj = vlm_hf.projections(cfg)
  for comp, targets, table in (("llm", cfg.lora.targets, proj["llm"]),
                               ("vision", cfg.lora.vision_targets, proj["vision"])):
    for t in targets:
      mod = path(comp, f"{_LAYERS[comp]}999999.{table[t]}.weight")[:-len(".weight")]
      alts.append(re.escape(mod).replace("999999", r"\d+"))
  return "|".join(f"(?:{a})" for a in alts)


def split(params: dict) -> tuple:
  """(adapters, trained): the LoRA factors, and what a LoRA stage trains besides them (connector,
  image_newline) that an adapter export carries."""
  flat = flatten_dict(params)
  adapters = unflatten_dict({k: v for k, v in flat.items() if k[-1] in ("lora_a", "lora_b")})
  trained = unflatten_dict({k: v for k, v in flat.items() if k[0] in ("connector", "image_newline")})
  return adapters, trained


def key_fn(path):
  """peft's key of a weight under module-path spelling `path` (component, canonical name)."""
  return lambda comp, nm: "base_model.model." + path(comp, nm)


def save(cfg: VLMConfig, params: dict, dst, *, base: str = None, dtype=None, names=None) -> list:
  """Write the adapter and the trained connector of `params` into dst; returns the files.
  `names` (component, canonical name) -> module path: default the transformers model's, the
  connector a modules_to_save module; convert/llava.py passes LLaVA's (no modules_to_save: its
  connector goes to non_lora_trainables.bin)."""
  if not cfg.lora.rank:
    raise ConversionError("this checkpoint has no LoRA adapters (lora.rank = 0)")
  adapters, trained = split(params)
  if names is None:
    path = _hf_modules(cfg)
    save_modules = ["multi_modal_projector"] if cfg.vision is not None else None
  else:
    path, save_modules = names, None
  key = key_fn(path)
  os.makedirs(dst, exist_ok=True)
  pairs = hf.iter_export(cfg, adapters, key)
  if save_modules:
    pairs = (p for it in (pairs, hf.iter_export(cfg, trained, key)) for p in it)
  files = tensors.write_weights(pairs, dst, dtype=dtype, max_shard_bytes=2**62, stem=ADAPTER_STEM)
  conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank,
          "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
          "target_modules": _target_modules(cfg, path, cfg.vision is None),
          "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
          "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
          "modules_to_save": save_modules,
          "base_model_name_or_path": os.path.abspath(base) if base and os.path.isdir(base) else base}
  with open(os.path.join(dst, ADAPTER_CONFIG), "w") as f:
    json.dump(conf, f, indent=2)
  files.append(os.path.join(dst, ADAPTER_CONFIG))
  return files
