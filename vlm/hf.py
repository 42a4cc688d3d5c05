"""Reading a HF transformers dir (Llama / Mistral / Llava / LlavaNext): vlm.from_pretrained's
reader, and convert/'s for the formats built on HF names (peft, compositions, LLaVA's).

Canonical HF names (after `canonical_name`) are component-relative: the LLM's names as inside
LlamaModel ('layers.3.self_attn.q_proj.weight', plus 'lm_head.weight'), the tower's as inside
CLIPVisionTransformer ('encoder.layers.0.mlp.fc1.weight'), the projector's ('linear_1.weight').
Every checkpoint spelling we meet (transformers 4 and 5 Llava layouts, bare Llama / CLIPVisionModel,
peft-wrapped modules) is reduced to those names first, so one rule table (`rules`: each family's,
vlm/families, plus the LLaVA connector) serves import and export (convert/hf.py writes with it).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Optional

import numpy as np

from vlm import families
from vlm.config import (LLAVA_NEXT_LLAMA3_SYSTEM, ConnectorConfig, TilerConfig, VisionConfig,
                        VLMConfig)
from vlm.errors import ConversionError
from vlm.jsonfile import load_json
from vlm.tensorfile import canonicalize, cast, find_weights, read_files


# --- names ---------------------------------------------------------------------------------------

_PREFIXES = (  # (regex on the full key, component)
    (r"^(?:model\.)?language_model\.model\.(.*)$", "llm"),
    (r"^(?:model\.)?language_model\.(lm_head\..*)$", "llm"),
    (r"^model\.language_model\.(.*)$", "llm"),
    (r"^(?:model\.)?vision_tower\.vision_model\.(.*)$", "vision"),
    (r"^(?:model\.)?vision_tower\.(.*)$", "vision"),
    (r"^vision_model\.(.*)$", "vision"),
    (r"^((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..*)$", "vision"),  # bare CLIPVisionModel
    (r"^(?:model\.)?multi_modal_projector\.(.*)$", "connector"),
    (r"^(?:model\.)?(image_newline)$", "top"),
    (r"^(lm_head\..*)$", "llm"),
    (r"^model\.(.*)$", "llm"),
)


def canonical_name(key: str) -> Optional[tuple]:
  """(component, name) for any spelling of a HF weight name, or None if it is not a weight we know."""
  key = re.sub(r"^base_model\.model\.", "", key)  # peft wrapper
  key = key.replace(".base_layer.", ".")
  key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)  # lora_A.default.weight
  for pat, comp in _PREFIXES:
    m = re.match(pat, key)
    if m:
      return comp, m.group(1)
  return None


# --- rules ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  path: tuple  # our parameter path
  component: str  # llm | vision | connector | top
  name: str  # canonical HF name; '{i}' marks a per-layer weight stacked on our axis 0
  kind: str = "copy"  # copy | linear (torch [out, in] <-> ours [in, out]) | conv

  @property
  def stacked(self) -> bool:
    return "{i}" in self.name


def _to_ours(kind, x):
  if kind == "linear":
    return x.T
  if kind == "conv":  # torch [out, in, kh, kw] -> ours [kh, kw, in, out]
    return x.transpose(2, 3, 1, 0)
  return x


def _hf_shape(kind, shape):
  """The HF-layout shape of one of our (per-layer) shapes."""
  shape = tuple(shape)
  if kind == "linear":
    return shape[::-1]
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def to_hf(kind, x):
  """One of our (per-layer) arrays in the HF layout of a rule's kind (the inverse of reading)."""
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  return x


def _rules(comp: str, part: list) -> list:
  return [Rule((comp,) + r.path, comp, r.name, r.kind) for r in part]


def projections(cfg: VLMConfig) -> dict:
  """component -> {our LoRA target: HF module inside a layer} of `cfg`'s families."""
  out = {"llm": families.of("llm", cfg.llm).hf.projections}
  if cfg.vision is not None:
    out["vision"] = families.of("vision", cfg.vision).hf.projections
  return out


def rules(cfg: VLMConfig) -> list:
  """Every parameter of `cfg`'s tree with its HF counterpart: the decoder's and the tower's from
  their families (vlm/families), the LLaVA connector and image_newline from here."""
  on = lambda targets: tuple(targets) if cfg.lora.rank > 0 else ()
  out = _rules("llm", families.of("llm", cfg.llm).hf.rules(cfg.llm, on(cfg.lora.targets)))
  if cfg.vision is None:
    return out
  out += _rules("vision", families.of("vision", cfg.vision).hf.rules(
      cfg.vision, on(cfg.lora.vision_targets)))
  from vlm.connector import depth
  for i in range(depth(cfg.connector.kind)):
    out += _rules("connector", families.linear((f"fc{i}",), f"linear_{i + 1}", bias=True))
  if cfg.tiler.kind == "anyres":
    out.append(Rule(("image_newline",), "top", "image_newline"))
  return out


def _layers(cfg: VLMConfig, comp: str) -> int:
  return cfg.llm.layers if comp == "llm" else cfg.vision.layers


def import_weights(cfg: VLMConfig, tensors: dict, *, source: str = "<memory>",
                   dtype=None, allow_missing: Iterable[str] = (), strict: bool = True,
                   components: Iterable[str] = ("llm", "vision", "connector", "top")) -> dict:
  """{(component, canonical name): array-or-loader} -> our nested params (numpy).

  `tensors` values may be zero-argument callables (lazy reads from safetensors). Missing and
  unexpected keys and shape mismatches raise ConversionError naming the key and `source`."""
  from flax import traverse_util
  from vlm.model import abstract_params   # local: vlm.model imports jax
  shapes = traverse_util.flatten_dict(abstract_params(cfg, boxed=False))
  used, flat = set(), {}
  allow = [re.compile(p) for p in allow_missing]
  components = set(components)
  for rule in rules(cfg):
    if rule.component not in components:
      continue
    n = _layers(cfg, rule.component) if rule.stacked else 1
    names = [rule.name.format(i=i) for i in range(n)] if rule.stacked else [rule.name]
    missing = [nm for nm in names if (rule.component, nm) not in tensors]
    if missing:
      if any(a.search("/".join(rule.path)) for a in allow):
        continue
      raise ConversionError(f"missing key {rule.component}:{missing[0]} in {source} "
                            f"(needed for {'/'.join(rule.path)})")
    want = tuple(shapes[rule.path].shape)
    per = want[1:] if rule.stacked else want
    x = None
    for j, nm in enumerate(names):  # one source tensor at a time, written into the stacked result
      t = tensors[(rule.component, nm)]
      where = getattr(t, "file", source)
      raw = t() if callable(t) and not hasattr(t, "shape") else t  # a Lazy knows its shape unread
      expect = _hf_shape(rule.kind, per)
      shape = tuple(raw.shape) if callable(raw) else np.shape(raw)
      if shape != expect:
        key = getattr(t, "key", f"{rule.component}:{nm}")
        raise ConversionError(f"shape mismatch for {key} in {where}: checkpoint {shape} vs model "
                              f"{expect} ({'/'.join(rule.path)})")
      a = _to_ours(rule.kind, np.asarray(raw() if callable(raw) else raw))
      if dtype is not None:
        a = cast(a, dtype, f"{getattr(t, 'key', nm)} in {where}")
      if not rule.stacked:
        x = np.ascontiguousarray(a)
        break
      if x is None:
        x = np.empty(want, a.dtype)
      x[j] = a
    used.update((rule.component, nm) for nm in names)
    flat[rule.path] = x
  unexpected = sorted(set(tensors) - used)
  if unexpected and strict:
    comp, nm = unexpected[0]
    t = tensors[unexpected[0]]
    raise ConversionError(f"unexpected key {getattr(t, 'key', f'{comp}:{nm}')} in "
                          f"{getattr(t, 'file', source)} ({len(unexpected)} unexpected in all)")
  return traverse_util.unflatten_dict(flat)


# --- configs -------------------------------------------------------------------------------------

def text_model_type(d: dict) -> str:
  """The HF model_type of a text config, from model_type or else its architecture class; one a
  decoder family reads (vlm/families)."""
  mt = d.get("model_type")
  if mt is None:
    arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
    by_arch = {a: t for f in families.LLM.values() for t, a in f.hf.model_types.items()}
    mt = by_arch.get(arch, arch)
  if families.for_model_type("llm", mt) is None:
    raise ConversionError(f"text model_type={mt!r} is not supported "
                          f"({' | '.join(families.model_types('llm'))})")
  return mt


def text_config(d: dict):
  """A HF text config dict (model_type or architectures say the family) -> its family's config."""
  d = dict(d, model_type=text_model_type(d))
  return families.for_model_type("llm", d["model_type"]).hf.read(d)


def vision_config(d: dict, select_layer: int = -2, keep_cls: bool = False) -> VisionConfig:
  """A HF vision config dict (model_type says the family; CLIP without one) -> its config."""
  mt = d.get("model_type", "clip_vision_model")
  fam = families.for_model_type("vision", mt)
  if fam is None:
    raise ConversionError(f"vision tower {mt!r} is not supported "
                          f"({' | '.join(families.model_types('vision'))})")
  v = fam.hf.read(d)
  return dataclasses.replace(v, select_layer=select_layer, keep_cls=keep_cls)


def template_for(text: dict, tokens: Optional[set], *, vlm: bool,
                 source: str = "config.json") -> str:
  """Our template for a HF text config trained by the LLaVA family (`vlm`) or used on its own:
  its decoder family's hook decides (model_type, tokenizer `tokens`, config hints)."""
  text = dict(text, model_type=text_model_type(text))
  fam = families.for_model_type("llm", text["model_type"])
  return fam.hf.template(text, tokens, vlm, source)


def llava_next_format(template: str) -> dict:
  """image_position / system of a LLaVA-1.6 (anyres) checkpoint: LLaVA-NeXT's code trains
  those (haotian-liu/LLaVA's train.py has no anyres), its Llama-3 models through
  preprocess_llama3 with its own system prompt."""
  return dict(image_position="first_next",
              system=LLAVA_NEXT_LLAMA3_SYSTEM if template == "llama3" else None)


def tokenizer_tokens(path) -> Optional[set]:
  """Added / special token strings of a HF dir's tokenizer files (tokenizer.json added_tokens and
  the chat markers of its vocabulary, tokenizer_config.json added_tokens_decoder and special
  tokens, added_tokens.json), None when it has none of those files."""
  out, found = set(), False
  for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json",
               "special_tokens_map.json"):
    f = os.path.join(path, name)
    if not os.path.exists(f):
      continue
    found = True
    d = load_json(f)
    if name == "tokenizer.json":
      out.update(t.get("content") for t in d.get("added_tokens") or ())
      vocab = (d.get("model") or {}).get("vocab") or {}   # Yi keeps <|im_start|> in its vocab
      pieces = vocab if isinstance(vocab, dict) else {p[0] for p in vocab}
      marks = {t for f in families.LLM.values() for t in f.hf.tokens}  # what template hooks read
      out.update(t for t in marks if t in pieces)
    elif name == "added_tokens.json":
      out.update(d)
    else:
      out.update(t.get("content") for t in (d.get("added_tokens_decoder") or {}).values())
      for k, v in d.items():
        if k.endswith("_token") or k == "additional_special_tokens":
          for x in v if isinstance(v, list) else [v]:
            out.add(x.get("content") if isinstance(x, dict) else x if isinstance(x, str) else None)
  out.discard(None)
  return out if found else None


def vlm_config(d: dict, *, image_mean=None, image_std=None, tokens: Optional[set] = None,
               source: str = "config.json") -> VLMConfig:
  """config.json of a HF Llama / Mistral / Llava / LlavaNext dir -> VLMConfig, with the prompt
  format its reference code trained it in (docs/conversion.md): `tokens` are the dir's tokenizer
  token strings (tokenizer_tokens)."""
  mt = d.get("model_type")
  if families.for_model_type("llm", mt) is not None:
    return VLMConfig(llm=text_config(d), template=template_for(d, tokens, vlm=False,
                                                                source=source))
  if mt not in ("llava", "llava_next"):
    known = families.model_types("llm") + ["llava", "llava_next"]
    raise ConversionError(f"unknown architecture model_type={mt!r} ({' | '.join(known)})")
  layer = d.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConversionError(f"vision_feature_layer={layer!r}: multi-layer features not supported")
  keep_cls = d.get("vision_feature_select_strategy", "default") == "full"
  vision = vision_config(d["vision_config"], layer, keep_cls)
  if image_mean is not None:
    vision = dataclasses.replace(vision, mean=tuple(image_mean), std=tuple(image_std))
  act = d.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise ConversionError(f"projector activation {act!r} is not supported (gelu)")
  text = dict(d["text_config"])
  text["model_type"] = text_model_type(text)
  llm = text_config(text)
  template = template_for(text, tokens, vlm=True, source=source)
  tiler, fmt = TilerConfig(kind="single"), {}
  if mt == "llava_next":
    tiler = TilerConfig(kind="anyres", grid_pinpoints=tuple(tuple(p) for p in d["image_grid_pinpoints"]))
    fmt = llava_next_format(template)
  tok = d.get("image_token_index", d.get("image_token_id"))
  return VLMConfig(llm=llm, vision=vision, tiler=tiler, connector=ConnectorConfig("mlp2x_gelu"),
                   image_token_id=tok, template=template, **fmt)


# --- reading a HF directory ----------------------------------------------------------------------

def weight_files(path) -> list:
  """Weight files of a HF dir: safetensors (sharded with an index, or single), else torch .bin
  pickles (read through torch.load(weights_only=True))."""
  files = find_weights(path)
  if not files:
    raise ConversionError(f"no model.safetensors(.index.json) or pytorch_model.bin in {path}")
  return files


def lazy_tensors(files: list) -> dict:
  """{(component, canonical name): loader} over weight files (safetensors; `.bin` through torch),
  read on demand one tensor at a time, bfloat16 included (see vlm/tensorfile.py)."""
  return canonicalize(read_files(files), canonical_name, source=", ".join(files))


def dir_config(path, *, prompt_format: bool = True) -> VLMConfig:
  """VLMConfig of a HF dir: config.json, image mean/std from preprocessor_config.json and the
  prompt format from config.json + the tokenizer files. prompt_format=False (an LLM for a
  composition, whose format is the preset's) skips the format checks."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ConversionError(f"no config.json in {path}")
  d = load_json(cfg_file)
  if "mm_vision_tower" in d or "mm_projector_type" in d:
    raise ConversionError(f"{cfg_file} is a LLaVA code-base config (mm_* keys): use --from llava "
                          "(`python -m convert import --from llava` writes a checkpoint dir)")
  mean = std = None
  pp = os.path.join(path, "preprocessor_config.json")
  if os.path.exists(pp):
    p = load_json(pp)
    mean, std = p.get("image_mean"), p.get("image_std")
  tokens = tokenizer_tokens(path) if prompt_format else set()
  return vlm_config(d, image_mean=mean, image_std=std, tokens=tokens, source=cfg_file)


def dir_tensors(path, cfg: VLMConfig) -> dict:
  """Lazy canonical tensors of a HF dir."""
  tensors = lazy_tensors(weight_files(path))
  if cfg.llm.tie_embeddings:  # some writers store the tied head too; it is the embedding
    tensors.pop(("llm", "lm_head.weight"), None)
  return tensors


def is_hf_dir(path) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def load_dir(path, *, dtype=None):
  """A HF Llama / Mistral / Llava / LlavaNext dir -> (VLMConfig, numpy params)."""
  cfg = dir_config(path)
  return cfg, import_weights(cfg, dir_tensors(path, cfg), source=path, dtype=dtype)
