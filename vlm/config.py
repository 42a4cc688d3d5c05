"""Model configuration: one frozen dataclass per part, composed into `VLMConfig`.

Configs are plain data (JSON round-trippable) so a checkpoint's `config.json` fully describes the
network (how it runs, `Runtime`, is not part of it); the decoder and tower configs name their
family (vlm/families). Presets below reproduce the published shapes (DFN5B ViT-H/14-378, CLIP
ViT-L/14-336, Llama-3-8B, Vicuna, Mistral-7B-Instruct-v0.2, Llama3-Med, LLaVA-1.5/1.6-13B).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from vlm import families
# The parts' configs and constants live with their family (vlm/families); VLMConfig composes them.
from vlm.families.clip import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,  # noqa: F401
                               VISION_PROJECTIONS, VisionConfig)
from vlm.families.llama import LLM_PROJECTIONS, LlamaConfig  # noqa: F401

# Llama3-Med llama3med/data/template/llama3_template.py: `system = "You are a helpful language and
# vision assistant. "`; the two string lines under it are separate statements, not part of it, so
# its Llama3Template renders exactly this, trailing space included, before <|eot_id|>.
LLAMA3_MED_SYSTEM = "You are a helpful language and vision assistant. "
# LLaVA-NeXT llava/train/train.py preprocess_llama3 (and conv_llava_llama_3): its llama3 models'.
LLAVA_NEXT_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to "
                            "understand the visual content that the user provides, and assist the "
                            "user with a variety of tasks using natural language.")

LLAVA16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class TilerConfig:
  """How an image becomes tower inputs: one tile, S2 multi-scale, or LLaVA-1.6 anyres."""
  kind: str = "single"  # single | s2 | anyres
  scales: tuple = ()  # s2: ascending sizes, each a multiple of the tower's image_size
  resize_mode: str = "squash"  # host-side geometry: squash | center_crop | pad
  grid_pinpoints: tuple = LLAVA16_PINPOINTS  # anyres: (height, width) candidates

  def input_size(self, vision: VisionConfig) -> int:
    """Side of the square image the host ships (largest S2 scale, else the tower's size)."""
    return max(self.scales) if self.kind == "s2" else vision.image_size

  def max_tiles(self, vision: VisionConfig) -> int:
    return anyres_max_tiles(self.grid_pinpoints, vision.image_size)


def anyres_max_tiles(pinpoints, tile: int) -> int:
  """anyres: tiles per image the model is given (base image + the largest pinpoint grid)."""
  return 1 + max((h // tile) * (w // tile) for h, w in pinpoints)


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  kind: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters: rank 0 disables them. Targets name decoder projections (LLM_PROJECTIONS);
  vision_targets name tower projections (VISION_PROJECTIONS) as the LDRT recipe does."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple = LLM_PROJECTIONS
  vision_targets: tuple = ()

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a network runs, not what it is: never saved in config.json (a run, a server or a bench
  picks these), so a checkpoint carries no settings that a converter or an export must undo."""
  dtype: str = "float32"  # compute dtype; params keep their own (float32 masters, bf16 frozen)
  remat: str = "none"  # decoder layers: none | full | save_dots | save_attn_proj
  # The vision tower's own policy (same names): its activations differ in shape and number from the
  # decoder's, and a frozen tower that no gradient crosses needs none.
  vision_remat: str = "none"
  attention: str = "xla"  # xla | cudnn | pallas | splash | auto
  # False: one parameter subtree per decoder layer (llm/layers_0, ...) instead of one scanned stack;
  # generation uses it on GPUs (see serve/generate.py). Checkpoints always hold the stacked layout.
  scan_layers: bool = True

  def replace(self, **kw) -> "Runtime":
    return dataclasses.replace(self, **kw)

  @property
  def compute_dtype(self):
    """`dtype` as a jnp dtype (imports jax: for model code)."""
    import jax.numpy as jnp
    return jnp.dtype(self.dtype)


RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(Runtime))


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """The whole model. `vision=None` gives a text-only LLM (a HF Llama dir loads that way)."""
  llm: LlamaConfig = LlamaConfig()
  vision: Optional[VisionConfig] = None
  tiler: TilerConfig = TilerConfig()
  connector: ConnectorConfig = ConnectorConfig()
  lora: LoraConfig = LoraConfig()
  image_token_id: int = -1
  template: str = "vicuna_v1"
  # How prompts are rendered (data/conversation.py), stored so that a checkpoint renders as it was
  # trained. None takes the template's defaults (and reads checkpoints written before the fields).
  image_position: Optional[str] = None  # keep | first | first_next
  system: Optional[str] = None  # system prompt; "" for none

  @property
  def feature_dim(self) -> int:
    """Channels the connector receives per image token."""
    n = len(self.tiler.scales) if self.tiler.kind == "s2" else 1
    return self.vision.width * n

  def image_tokens(self, image_hw: Optional[tuple] = None) -> int:
    """Placeholder ids one image expands to; anyres needs the original (height, width)."""
    if self.vision is None:
      return 0
    if self.tiler.kind == "anyres":
      if image_hw is None:
        raise ValueError("anyres: the placeholder count depends on the image size")
      from vlm import tiler  # local: tiler imports jax
      return tiler.anyres_num_features(image_hw, self.tiler.grid_pinpoints,
                                       self.vision.image_size, self.vision.patch_size)
    return self.vision.tokens

  def replace(self, **kw) -> "VLMConfig":
    return dataclasses.replace(self, **kw)

  # --- serialization -------------------------------------------------------------------------
  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, d: dict) -> "VLMConfig":
    # config.json written before Runtime existed carries its fields; they are dropped (the loader
    # picks the runtime now, as it could override them before)
    d = {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}
    for key, default in (("llm", "llama"), ("vision", "clip")):  # the part's family says its class
      if d.get(key) is not None:
        d[key] = _build(families.get(key, d[key].get("family", default)).config, d[key])
    for key, typ in {"tiler": TilerConfig, "connector": ConnectorConfig, "lora": LoraConfig}.items():
      if d.get(key) is not None:
        d[key] = _build(typ, d[key])
    return _build(cls, d)


def _tuplify(v: Any) -> Any:
  if isinstance(v, list):
    return tuple(_tuplify(x) for x in v)
  return v


def _build(typ, d: dict):
  names = {f.name for f in dataclasses.fields(typ)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"{typ.__name__}: unknown keys {sorted(unknown)}")
  return typ(**{k: (v if dataclasses.is_dataclass(v) else _tuplify(v)) for k, v in d.items()})


# --- presets -------------------------------------------------------------------------------------

DFN5B_CLIP_VIT_H_14_378 = VisionConfig(
    image_size=378, patch_size=14, width=1280, layers=32, heads=16, mlp_dim=5120,
    act="quick_gelu", proj_dim=1024)
CLIP_VIT_L_14_336 = VisionConfig(
    image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
    act="quick_gelu", proj_dim=768)

LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp_dim=14336,
    norm_eps=1e-5, rope_theta=500000.0, max_positions=8192)
LLAMA3_8B_INSTRUCT = LLAMA3_8B
VICUNA_7B = LlamaConfig(
    vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008,
    norm_eps=1e-5, rope_theta=10000.0, max_positions=4096)
VICUNA_13B = LlamaConfig(
    vocab_size=32000, hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128, mlp_dim=13824,
    norm_eps=1e-5, rope_theta=10000.0, max_positions=4096)
MISTRAL_7B_INSTRUCT_V02 = LlamaConfig(
    vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp_dim=14336,
    norm_eps=1e-5, rope_theta=1e6, max_positions=32768)


def _grow_vocab(llm: LlamaConfig, n: int = 1) -> LlamaConfig:
  """LLaVA adds `<image>` as a new token and grows the embeddings by that many rows."""
  return dataclasses.replace(llm, vocab_size=llm.vocab_size + n)


# Llama3-Med: S2 (378, 756, 1134) DFN5B tower -> 729 x 3840 -> mlp2x_gelu -> Llama-3-8B-Instruct.
# Its code (llama3med/data/template/) keeps <image> where the data puts it and its llama3 template
# always renders its system prompt.
LLAMA3_MED = VLMConfig(
    llm=_grow_vocab(LLAMA3_8B_INSTRUCT), vision=DFN5B_CLIP_VIT_H_14_378,
    tiler=TilerConfig(kind="s2", scales=(378, 756, 1134)), connector=ConnectorConfig("mlp2x_gelu"),
    image_token_id=LLAMA3_8B.vocab_size, template="llama3", image_position="keep",
    system=LLAMA3_MED_SYSTEM)
# The Mistral variant: no Mistral template in the Llama3-Med code, so Mistral's own format and no
# system prompt; the image stays where the data puts it, as in all of that code.
LLAMA3_MED_MISTRAL = LLAMA3_MED.replace(
    llm=_grow_vocab(MISTRAL_7B_INSTRUCT_V02), image_token_id=MISTRAL_7B_INSTRUCT_V02.vocab_size,
    template="mistral_instruct", system=None)
# LLaVA-1.5/1.6 as the llava-hf checkpoints ship them: vocab padded to 32064, <image> = 32000.
LLAVA15_13B = VLMConfig(
    llm=dataclasses.replace(VICUNA_13B, vocab_size=32064), vision=CLIP_VIT_L_14_336,
    tiler=TilerConfig(kind="single"), connector=ConnectorConfig("mlp2x_gelu"),
    image_token_id=32000, template="vicuna_v1")
# LLaVA-1.6 is trained by LLaVA-NeXT's code: its image placement rule (what the import records)
LLAVA16_VICUNA_13B = LLAVA15_13B.replace(tiler=TilerConfig(kind="anyres"),
                                         image_position="first_next")
LLAVA15_7B = LLAVA15_13B.replace(llm=dataclasses.replace(VICUNA_7B, vocab_size=32064))

PRESETS = {
    "llama3_med": LLAMA3_MED,
    "llama3_med_mistral": LLAMA3_MED_MISTRAL,
    "llava15_7b": LLAVA15_7B,
    "llava15_13b": LLAVA15_13B,
    "llava16_vicuna_13b": LLAVA16_VICUNA_13B,
    "llama3_8b": VLMConfig(llm=LLAMA3_8B, template="llama3"),
    "vicuna_7b": VLMConfig(llm=VICUNA_7B),
    "vicuna_13b": VLMConfig(llm=VICUNA_13B),
    "mistral_7b_instruct_v02": VLMConfig(llm=MISTRAL_7B_INSTRUCT_V02, template="mistral_instruct"),
}


def preset(name: str) -> VLMConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
