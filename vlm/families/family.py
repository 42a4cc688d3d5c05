"""The row type of the family table (vlm/families/__init__.py) and the HF weight rule: what every
family file builds its `FAMILY` from."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional


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
  tokens: tuple = ()  # vocabulary pieces `template` looks for (vlm/hf.py tokenizer_tokens)


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
