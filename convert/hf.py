"""Writing HF transformers checkpoints: config.json / preprocessor_config.json of a VLMConfig and
the weights under transformers 5's names, through the same rule table vlm/hf.py reads with.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from vlm import families
from vlm.config import VLMConfig
from vlm.errors import ConversionError
from vlm.hf import rules, to_hf


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
               np.ascontiguousarray(to_hf(rule.kind, x[i])))
    else:
      yield name_fn(rule.component, rule.name), np.ascontiguousarray(to_hf(rule.kind, x))


def vision_hf_config(v) -> dict:
  """A tower's config -> the transformers config dict of its family (CLIPVisionConfig)."""
  return families.of("vision", v).hf.write(v)


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
  """VLMConfig -> the config.json transformers expects: the decoder family's (Llama / Mistral)
  or a Llava / LlavaNext around the decoder's and the tower's family configs."""
  c = cfg.llm
  fam = families.of("llm", c)
  text = fam.hf.write(c)
  if cfg.vision is None:
    return dict(text, architectures=[fam.hf.model_types[text["model_type"]]])
  if cfg.tiler.kind == "s2":
    raise ConversionError("S2 multi-scale models have no transformers class; export with "
                          "`--to llava` (the LLaVA code-base layout with s2 config keys)")
  if cfg.connector.kind != "mlp2x_gelu":
    raise ConversionError(f"connector {cfg.connector.kind!r}: transformers Llava needs mlp2x_gelu")
  v = cfg.vision
  vision = vision_hf_config(v)
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
