"""The CLIP family: ViT towers of HF CLIPVisionModel (and open_clip VisionTransformer, whose names
convert/open_clip.py reduces to these). Config: VisionConfig; module:
vlm.vision.VisionTower."""
from __future__ import annotations

import dataclasses
from typing import Optional

from vlm.errors import ConversionError
from vlm.families.family import HF, Family, WeightRule, linear

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The tower projections LoRA can target, in module order (vlm/vision.py names them so).
VISION_PROJECTIONS = ("q", "k", "v", "o", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP ViT vision tower (HF CLIPVisionModel and open_clip VisionTransformer share this shape)."""
  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  act: str = "quick_gelu"  # quick_gelu | gelu (exact erf)
  norm_eps: float = 1e-5
  # Index into HF's `hidden_states` tuple (0 = embeddings after ln_pre, L = last layer); negative
  # counts from the end, so -2 is the penultimate layer's output, the LLaVA default.
  select_layer: int = -2
  keep_cls: bool = False
  mean: tuple = OPENAI_CLIP_MEAN
  std: tuple = OPENAI_CLIP_STD
  proj_dim: Optional[int] = None  # open_clip/HF visual projection, kept only for round trips
  family: str = "clip"  # its row in vlm/families (module + HF mapping)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def tokens(self) -> int:
    return self.grid ** 2 + (1 if self.keep_cls else 0)

  @property
  def layers_used(self) -> int:
    """Number of transformer layers that must run to produce the selected hidden state."""
    n = self.select_layer if self.select_layer >= 0 else self.layers + 1 + self.select_layer
    if not 0 <= n <= self.layers:
      raise ValueError(f"select_layer={self.select_layer} out of range for {self.layers} layers")
    return n


# LoRA target name (VISION_PROJECTIONS, in order) -> HF module path in a tower layer.
PROJECTIONS = dict(zip(VISION_PROJECTIONS, (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2")))


def rules(c: VisionConfig, lora_targets: tuple) -> list:
  """Names as inside CLIPVisionTransformer ('encoder.layers.{i}.mlp.fc1.weight')."""
  out = [WeightRule(("patch_embed",), "embeddings.patch_embedding.weight", "conv"),
         WeightRule(("cls",), "embeddings.class_embedding"),
         WeightRule(("pos_embed",), "embeddings.position_embedding.weight")]
  for ours, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    out += [WeightRule((ours, "scale"), f"{hf}.weight"), WeightRule((ours, "bias"), f"{hf}.bias")]
  blk = ("layers", "block")
  for ours, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
    out += [WeightRule(blk + (ours, "scale"), f"encoder.layers.{{i}}.{hf}.weight"),
            WeightRule(blk + (ours, "bias"), f"encoder.layers.{{i}}.{hf}.bias")]
  for ours, hf in PROJECTIONS.items():
    out += linear(blk + (ours,), f"encoder.layers.{{i}}.{hf}", bias=True,
                  lora=ours in lora_targets)
  return out


def read(d: dict) -> VisionConfig:
  """A transformers CLIPVisionConfig dict (feature layer and CLS: the defaults; the caller sets
  them, and the image mean / std of a preprocessor_config.json)."""
  act = d.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ConversionError(f"vision activation {act!r} is not supported (quick_gelu | gelu)")
  return VisionConfig(
      image_size=d["image_size"], patch_size=d["patch_size"], width=d["hidden_size"],
      layers=d["num_hidden_layers"], heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
      act=act, norm_eps=d.get("layer_norm_eps", 1e-5), mean=tuple(OPENAI_CLIP_MEAN),
      std=tuple(OPENAI_CLIP_STD), proj_dim=d.get("projection_dim"))


def write(v: VisionConfig) -> dict:
  """A transformers CLIPVisionConfig dict."""
  return {"model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
          "hidden_size": v.width, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
          "intermediate_size": v.mlp_dim, "hidden_act": v.act, "layer_norm_eps": v.norm_eps,
          "projection_dim": v.proj_dim or v.width}


FAMILY = Family(
    name="clip", part="vision", config=VisionConfig, module="vlm.vision:VisionTower",
    hf=HF(model_types={"clip_vision_model": "CLIPVisionModel"}, rules=rules, read=read,
          write=write, projections=PROJECTIONS))
