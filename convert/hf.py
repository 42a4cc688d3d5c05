"""HF transformers <-> medvlm-jax: configs and the one weight-name table both directions use.

Canonical HF names (after `canonical_name`) are component-relative: the LLM's names as inside
LlamaModel ('layers.3.self_attn.q_proj.weight', plus 'lm_head.weight'), the tower's as inside
CLIPVisionTransformer ('encoder.layers.0.mlp.fc1.weight'), the projector's ('linear_1.weight').
Every checkpoint spelling we meet (transformers 4 and 5 Llava layouts, bare Llama / CLIPVisionModel,
peft-wrapped modules) is reduced to those names first, so one rule table serves import and export.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional

import numpy as np

from data.conversation import LLAVA_NEXT_LLAMA3_SYSTEM
from data.errors import UserError
from data.jsonfile import load_json
from vlm.config import (ConnectorConfig, LlamaConfig, TilerConfig, VisionConfig,
                        VLMConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


class ConversionError(UserError):
  """One-line conversion failure naming the key, file and shapes involved."""


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


def _to_hf(kind, x):
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  return x


def _linear(path, comp, name, bias=False, lora=False):
  rules = [Rule(path + ("kernel",), comp, name + ".weight", "linear")]
  if bias:
    rules.append(Rule(path + ("bias",), comp, name + ".bias"))
  if lora:
    rules += [Rule(path + ("lora_a",), comp, name + ".lora_A.weight", "linear"),
              Rule(path + ("lora_b",), comp, name + ".lora_B.weight", "linear")]
  return rules


LLM_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}
VISION_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def rules(cfg: VLMConfig) -> list:
  """Every parameter of `cfg`'s tree with its HF counterpart."""
  out = [Rule(("llm", "embed"), "llm", "embed_tokens.weight"),
         Rule(("llm", "norm", "scale"), "llm", "norm.weight"),
         Rule(("llm", "layers", "layer", "attn_norm", "scale"), "llm", "layers.{i}.input_layernorm.weight"),
         Rule(("llm", "layers", "layer", "mlp_norm", "scale"), "llm",
              "layers.{i}.post_attention_layernorm.weight")]
  if not cfg.llm.tie_embeddings:
    out += _linear(("llm", "lm_head"), "llm", "lm_head")
  for ours, hf in LLM_PROJ.items():
    sub = ("attn",) if ours in ("q", "k", "v", "o") else ("mlp",)
    out += _linear(("llm", "layers", "layer") + sub + (ours,), "llm", f"layers.{{i}}.{hf}",
                   lora=cfg.lora.rank > 0 and ours in cfg.lora.targets)
  if cfg.vision is None:
    return out
  v = ("vision",)
  out += [Rule(v + ("patch_embed",), "vision", "embeddings.patch_embedding.weight", "conv"),
          Rule(v + ("cls",), "vision", "embeddings.class_embedding"),
          Rule(v + ("pos_embed",), "vision", "embeddings.position_embedding.weight")]
  for ours, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    out += [Rule(v + (ours, "scale"), "vision", f"{hf}.weight"),
            Rule(v + (ours, "bias"), "vision", f"{hf}.bias")]
  blk = v + ("layers", "block")
  for ours, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
    out += [Rule(blk + (ours, "scale"), "vision", f"encoder.layers.{{i}}.{hf}.weight"),
            Rule(blk + (ours, "bias"), "vision", f"encoder.layers.{{i}}.{hf}.bias")]
  for ours, hf in VISION_PROJ.items():
    out += _linear(blk + (ours,), "vision", f"encoder.layers.{{i}}.{hf}", bias=True,
                   lora=cfg.lora.rank > 0 and ours in cfg.lora.vision_targets)
  from vlm.connector import depth
  for i in range(depth(cfg.connector.kind)):
    out += _linear(("connector", f"fc{i}"), "connector", f"linear_{i + 1}", bias=True)
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
  from vlm.model import abstract_params
  from flax import traverse_util
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
        from convert.tensors import cast
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


def iter_export(cfg: VLMConfig, params: dict, name_fn: Callable[[str, str], str]):
  """Our params -> (full HF name, numpy array) pairs, one tensor at a time (streaming writers);
  `name_fn(component, canonical)` spells the layout. Paths absent from `params` are skipped."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  for rule in rules(cfg):
    if rule.path not in flat:
      continue
    x = np.asarray(flat[rule.path])  # host arrays: no copy; slicing below stays in numpy
    if rule.stacked:
      for i in range(x.shape[0]):
        yield (name_fn(rule.component, rule.name.format(i=i)),
               np.ascontiguousarray(_to_hf(rule.kind, x[i])))
    else:
      yield name_fn(rule.component, rule.name), np.ascontiguousarray(_to_hf(rule.kind, x))


def export_weights(cfg: VLMConfig, params: dict, name_fn: Callable[[str, str], str]) -> dict:
  """Our params -> {full HF name: numpy array}; `name_fn(component, canonical)` spells the
  layout."""
  return dict(iter_export(cfg, params, name_fn))


# --- configs -------------------------------------------------------------------------------------

def llama_config(d: dict) -> LlamaConfig:
  rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
  theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
  kind = rp.get("rope_type", rp.get("type", "default"))
  scaling = None
  if kind == "llama3":
    scaling = ("llama3", float(rp["factor"]), float(rp["low_freq_factor"]),
               float(rp["high_freq_factor"]), int(rp["original_max_position_embeddings"]))
  elif kind not in ("default", None):
    raise ConversionError(f"rope type {kind!r} is not supported (default | llama3)")
  heads = d["num_attention_heads"]
  return LlamaConfig(
      vocab_size=d["vocab_size"], hidden=d["hidden_size"], layers=d["num_hidden_layers"],
      heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads, mlp_dim=d["intermediate_size"],
      norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
      max_positions=d.get("max_position_embeddings", 4096),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      sliding_window=d.get("sliding_window") if d.get("model_type") == "mistral" else None)


def vision_config(d: dict, select_layer: int = -2, keep_cls: bool = False) -> VisionConfig:
  act = d.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ConversionError(f"vision activation {act!r} is not supported (quick_gelu | gelu)")
  return VisionConfig(
      image_size=d["image_size"], patch_size=d["patch_size"], width=d["hidden_size"],
      layers=d["num_hidden_layers"], heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
      act=act, norm_eps=d.get("layer_norm_eps", 1e-5), select_layer=select_layer, keep_cls=keep_cls,
      mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD), proj_dim=d.get("projection_dim"))


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|start_header_id|>", "<|eot_id|>")


def text_model_type(d: dict) -> str:
  """'llama' | 'mistral' of a text config, from model_type or else its architecture class."""
  mt = d.get("model_type")
  if mt is None:
    arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
    mt = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama"}.get(arch, arch)
  if mt not in ("llama", "mistral"):
    raise ConversionError(f"text model_type={mt!r} is not supported (llama | mistral)")
  return mt


def template_for(text: dict, tokens: Optional[set], *, vlm: bool,
                 source: str = "config.json") -> str:
  """Our template for a Llama / Mistral text config trained by the LLaVA family (`vlm`) or used
  on its own. Mistral is told by its model_type; model_type 'llama' covers Llama-2 / Vicuna,
  Llama-3 and Yi (LLaVA-1.6-34B), which only the tokenizer's special tokens tell apart
  (`tokens`; without tokenizer files Llama-3's bos id or vocabulary size is the hint)."""
  if text_model_type(text) == "mistral":
    # LLaVA / LLaVA-NeXT conv_mistral_instruct (LLAMA_2 style, system "") for LLaVA-1.6-Mistral
    # and LLaVA-Med v1.5; a bare Mistral speaks its own format (mistral-common)
    return "llava_mistral" if vlm else "mistral_instruct"
  tokens = tokens or set()
  if any(t in tokens for t in CHATML_TOKENS):
    raise ConversionError(f"{source}: a ChatML tokenizer ({CHATML_TOKENS[0]}): trained in "
                          "LLaVA's chatml_direct template (LLaVA-1.6-34B), which medvlm-jax does "
                          "not support")
  if (all(t in tokens for t in LLAMA3_TOKENS) or text.get("bos_token_id") == 128000
      or text.get("vocab_size", 0) >= 128000):   # the config's hints, for dirs without tokenizer
    return "llama3"
  return "vicuna_v1"


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
  import os
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
      out.update(t for t in CHATML_TOKENS + LLAMA3_TOKENS if t in pieces)
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
  if mt in ("llama", "mistral"):
    return VLMConfig(llm=llama_config(d), template=template_for(d, tokens, vlm=False,
                                                                 source=source))
  if mt not in ("llava", "llava_next"):
    raise ConversionError(f"unknown architecture model_type={mt!r} "
                          "(llama | mistral | llava | llava_next)")
  if d.get("vision_config", {}).get("model_type", "clip_vision_model") != "clip_vision_model":
    raise ConversionError(f"vision tower {d['vision_config'].get('model_type')!r} is not CLIP")
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
  llm = llama_config(text)
  template = template_for(text, tokens, vlm=True, source=source)
  tiler, fmt = TilerConfig(kind="single"), {}
  if mt == "llava_next":
    tiler = TilerConfig(kind="anyres", grid_pinpoints=tuple(tuple(p) for p in d["image_grid_pinpoints"]))
    fmt = llava_next_format(template)
  tok = d.get("image_token_index", d.get("image_token_id"))
  return VLMConfig(llm=llm, vision=vision, tiler=tiler, connector=ConnectorConfig("mlp2x_gelu"),
                   image_token_id=tok, template=template, **fmt)


def clip_vision_config(v: VisionConfig) -> dict:
  """VisionConfig -> a transformers CLIPVisionConfig dict."""
  return {"model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
          "hidden_size": v.width, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
          "intermediate_size": v.mlp_dim, "hidden_act": v.act, "layer_norm_eps": v.norm_eps,
          "projection_dim": v.proj_dim or v.width}


def preprocessor_config(cfg: VLMConfig) -> dict:
  """preprocessor_config.json of the tower: CLIPImageProcessor (LlavaNextImageProcessor for
  anyres)."""
  v = cfg.vision
  size = cfg.tiler.input_size(v)
  out = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
         "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
         "crop_size": {"height": size, "width": size}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean),
         "image_std": list(v.std), "do_convert_rgb": True}
  if cfg.tiler.kind == "anyres":
    out.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
               image_grid_pinpoints=[list(p) for p in cfg.tiler.grid_pinpoints])
  return out


def hf_config(cfg: VLMConfig) -> dict:
  """VLMConfig -> the config.json transformers expects (Llama / Mistral / Llava / LlavaNext)."""
  c = cfg.llm
  text = {"vocab_size": c.vocab_size, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
          "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
          "intermediate_size": c.mlp_dim, "rms_norm_eps": c.norm_eps,
          "max_position_embeddings": c.max_positions, "tie_word_embeddings": c.tie_embeddings,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "model_type": "mistral" if c.sliding_window else "llama"}
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    _, factor, low, high, old = c.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=old)
  text["rope_parameters"] = rope
  if c.sliding_window:
    text["sliding_window"] = c.sliding_window
  if cfg.vision is None:
    arch = "MistralForCausalLM" if text["model_type"] == "mistral" else "LlamaForCausalLM"
    return dict(text, architectures=[arch])
  if cfg.tiler.kind == "s2":
    raise ConversionError("S2 multi-scale models have no transformers class; export with "
                          "`--to llava` (the LLaVA code-base layout with s2 config keys)")
  if cfg.connector.kind != "mlp2x_gelu":
    raise ConversionError(f"connector {cfg.connector.kind!r}: transformers Llava needs mlp2x_gelu")
  v = cfg.vision
  vision = clip_vision_config(v)
  out = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
         "text_config": text, "vision_config": vision, "image_token_index": cfg.image_token_id,
         "projector_hidden_act": "gelu", "vision_feature_layer": v.select_layer,
         "vision_feature_select_strategy": "full" if v.keep_cls else "default",
         "multimodal_projector_bias": True, "tie_word_embeddings": c.tie_embeddings}
  if cfg.tiler.kind == "anyres":
    out.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
               image_grid_pinpoints=[list(p) for p in cfg.tiler.grid_pinpoints])
  return out


def hf_name(cfg: VLMConfig) -> Callable[[str, str], str]:
  """The key layout transformers 5 writes with save_pretrained (and reads back without renames)."""
  if cfg.vision is None:
    return lambda comp, nm: nm if nm.startswith("lm_head.") else f"model.{nm}"

  def name(comp, nm):
    if comp == "llm":
      return f"language_model.{nm}" if nm.startswith("lm_head.") else f"language_model.model.{nm}"
    if comp == "vision":
      return f"vision_tower.{nm}"
    if comp == "connector":
      return f"multi_modal_projector.{nm}"
    return nm
  return name


# --- reading a HF directory ----------------------------------------------------------------------

def weight_files(path) -> list:
  """safetensors files of a HF dir (sharded with an index, or single). `.bin` pickles are refused
  here: the `python -m convert` CLI reads them through torch.load(weights_only=True)."""
  import os
  idx = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(idx):
    files = sorted(set(load_json(idx)["weight_map"].values()))
    return [os.path.join(path, x) for x in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {path}")


def lazy_tensors(files: list) -> dict:
  """{(component, canonical name): loader} over weight files (safetensors; `.bin` through torch),
  read on demand one tensor at a time, bfloat16 included (see convert/tensors.py)."""
  from convert import tensors
  return tensors.canonicalize(tensors.read_files(files), canonical_name, source=", ".join(files))


def dir_config(path, *, prompt_format: bool = True) -> VLMConfig:
  """VLMConfig of a HF dir: config.json, image mean/std from preprocessor_config.json and the
  prompt format from config.json + the tokenizer files. prompt_format=False (an LLM for a
  composition, whose format is the preset's) skips the format checks."""
  import os
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ConversionError(f"no config.json in {path}")
  d = load_json(cfg_file)
  if "mm_vision_tower" in d or "mm_projector_type" in d:
    raise ConversionError(f"{cfg_file} is a LLaVA code-base config (mm_* keys): use --from llava")
  mean = std = None
  pp = os.path.join(path, "preprocessor_config.json")
  if os.path.exists(pp):
    p = load_json(pp)
    mean, std = p.get("image_mean"), p.get("image_std")
  tokens = tokenizer_tokens(path) if prompt_format else set()
  return vlm_config(d, image_mean=mean, image_std=std, tokens=tokens, source=cfg_file)


def dir_tensors(path, cfg: VLMConfig, files=None) -> dict:
  """Lazy canonical tensors of a HF dir; `files` overrides the safetensors found in `path`."""
  tensors = lazy_tensors(files or weight_files(path))
  if cfg.llm.tie_embeddings:  # some writers store the tied head too; it is the embedding
    tensors.pop(("llm", "lm_head.weight"), None)
  return tensors


def load_dir(path, *, dtype=None, files=None):
  """A HF Llama / Mistral / Llava / LlavaNext dir -> (VLMConfig, numpy params)."""
  cfg = dir_config(path)
  return cfg, import_weights(cfg, dir_tensors(path, cfg, files), source=path, dtype=dtype)
