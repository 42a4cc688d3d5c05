"""Model families: the decoder and the vision tower are each picked by name from one table.

A part's config names its row (`LlamaConfig.family`, `VisionConfig.family`; config.json written
before the field loads as llama / clip). A row (`Family`) holds all that differs between families:

  config   the part's config dataclass (plain data, saved in config.json under the part)
  module   its flax module, as "package.module:Class", imported on first use: this table and
           vlm.config stay free of jax (data workers import them)
  hf       its HF mapping (`HF`): per-layer weight-name rules with their kind, the HF config reader
           and writer, the LoRA projection names; pure data and functions (no torch, no convert:
           convert/hf.py applies them to any family)

Adding a family is one file here (its config dataclass, HF mapping and row) beside its module, and
one row in LLM / VISION below: docs/adding_a_model_family.md.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional


class HFConfigError(ValueError):
  """A HF config this family cannot represent (convert/ reports it as a ConversionError)."""


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """One parameter of a part: our path inside the part's subtree, the HF name inside the part's HF
  module ('{i}': a per-layer weight, stacked on our axis 0) and how the layouts differ."""
  path: tuple
  name: str
  kind: str = "copy"  # copy | linear (torch [out, in] <-> ours [in, out]) | conv (torch OIHW)


def linear(path: tuple, name: str, *, bias: bool = False, lora: bool = False) -> list:
  """The rules of one vlm.lora.Dense: kernel (+ bias) (+ its LoRA factors, peft's names)."""
  out = [WeightRule(path + ("kernel",), name + ".weight", "linear")]
  if bias:
    out.append(WeightRule(path + ("bias",), name + ".bias"))
  if lora:
    out += [WeightRule(path + ("lora_a",), name + ".lora_A.weight", "linear"),
            WeightRule(path + ("lora_b",), name + ".lora_B.weight", "linear")]
  return out


@dataclasses.dataclass(frozen=True)
class HF:
  """The HF transformers half of a family."""
  # HF model_type -> the transformers class of a bare model of it (the writer picks the type)
  model_types: dict
  # (part config, LoRA targets: names of `projections` carrying adapters) -> [WeightRule]
  rules: Callable
  read: Callable  # HF config dict (a Llava's text_config / vision_config) -> part config
  write: Callable  # part config -> HF config dict, model_type included
  projections: dict  # LoRA target name (ours) -> HF module path inside a layer (peft names)
  # decoders: (HF text config, tokenizer token strings or None, trained as a VLM?, source) ->
  # our prompt template name (data/conversation.py)
  template: Optional[Callable] = None
  tokens: tuple = ()  # vocabulary pieces `template` looks for (convert/hf.tokenizer_tokens)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  part: str  # llm | vision
  config: type
  module: str  # "package.module:Class"
  hf: HF

  def module_class(self):
    mod, cls = self.module.split(":")
    return getattr(importlib.import_module(mod), cls)


from vlm.families import clip, llama  # noqa: E402  (the rows below need Family)

LLM = {f.name: f for f in (llama.FAMILY,)}
VISION = {f.name: f for f in (clip.FAMILY,)}
_TABLES = {"llm": LLM, "vision": VISION}


def get(part: str, name: str) -> Family:
  """The row of family `name` of `part` (llm | vision); an unknown name is one ValueError line."""
  table = _TABLES[part]
  if name not in table:
    raise ValueError(f"unknown {part} family {name!r}; known: {sorted(table)} "
                     "(vlm/families/__init__.py)")
  return table[name]


def of(part: str, cfg) -> Family:
  """The row of a part config (its `family` field)."""
  return get(part, cfg.family)


def for_model_type(part: str, model_type: str) -> Optional[Family]:
  """The row reading HF model_type `model_type`, or None."""
  return next((f for f in _TABLES[part].values() if model_type in f.hf.model_types), None)


def model_types(part: str) -> list:
  """Every HF model_type the `part` families read, in table order."""
  return [t for f in _TABLES[part].values() for t in f.hf.model_types]
