"""Model families: the decoder and the vision tower are each picked by name from one table.

A part's config names its row (`LlamaConfig.family`, `VisionConfig.family`; config.json written
before the field loads as llama / clip). A row (`Family`) holds all that differs between families:

  config   the part's config dataclass (plain data, saved in config.json under the part), defined
           in the family's file: vlm.config composes them (config -> families, one way)
  module   its flax module, as "package.module:Class", imported on first use: this table and
           vlm.config stay free of jax (data workers import them)
  hf       its HF mapping (`HF`): per-layer weight-name rules with their kind, the HF config reader
           and writer, the LoRA projection names; pure data and functions (no torch: vlm/hf.py
           reads and convert/hf.py writes any family with them)

Adding a family is one file here (its config dataclass, HF mapping and row, built from the row
types of family.py) beside its module, and one row in LLM / VISION below:
docs/adding_a_model_family.md.
"""
from __future__ import annotations

from typing import Optional

from vlm.families import clip, llama
from vlm.families.family import HF, Family, WeightRule, linear  # noqa: F401  (the row types)

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
