"""A fresh VLM from parts: a HF Llama/Mistral dir + a CLIP tower (open_clip or HF) + a connector
(new from a seed, or a stage-1 projector file), laid out as a preset says (llama3_med: S2 at
378/756/1134 with the DFN5B tower, mlp2x_gelu, Llama-3-8B-Instruct).

Shapes come from the given parts; the preset contributes the tiler, connector kind, feature layer
and prompt format (template, image position, system prompt). When a part's shapes differ from the
preset's (tiny test models), S2 scales are rescaled to the tower's resolution and the difference is
logged.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from convert import llava, tower
from vlm import hf as vlm_hf, tensorfile  # reading HF dirs and weight files
from vlm.config import VLMConfig, preset
from vlm.errors import ConversionError


def _diff(a, b, skip=()) -> list:
  return [f"{f.name} {getattr(a, f.name)} vs {getattr(b, f.name)}" for f in dataclasses.fields(a)
          if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)]


def init_connector(cfg: VLMConfig, seed: int) -> dict:
  """Connector params for `cfg` (float32 masters) initialized from `seed`, alone (no LLM in RAM)."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from vlm.connector import Connector
  mod = Connector(cfg.connector.kind, cfg.llm.hidden)
  params = jax.jit(mod.init)(jax.random.key(seed), jnp.zeros((1, 1, cfg.feature_dim), jnp.float32))
  return jax.tree_util.tree_map(np.asarray, nn.unbox(params["params"]))


def connector_tensors(path) -> dict:
  """A stage-1 projector: LLaVA's mm_projector.bin, or safetensors with HF Llava names
  (multi_modal_projector.linear_N.*) -> {("connector", name): loader}."""
  def name(key):
    canon = llava.canonical_name(key) or vlm_hf.canonical_name(key)
    return canon if canon is not None and canon[0] == "connector" else None
  return tensorfile.canonicalize(tensorfile.read_files([path]), name, source=path)


def compose(llm_dir: str, vision_dir: str, preset_name: str, *, connector: Optional[str] = None,
            seed: int = 0, dtype=None, s2_scales=None, log=print):
  """-> (VLMConfig, numpy params). The tokenizer is the LLM dir's (the CLI adds `<image>`)."""
  try:
    p = preset(preset_name)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  if p.vision is None:
    raise ConversionError(f"preset {preset_name!r} has no vision tower")
  if p.tiler.kind == "anyres":
    raise ConversionError(f"preset {preset_name!r}: composing anyres models is not supported "
                          "(no image_newline source); import a LLaVA-1.6 checkpoint instead")
  llm_cfg = vlm_hf.dir_config(llm_dir, prompt_format=False)   # the preset says the format
  if llm_cfg.vision is not None:
    raise ConversionError(f"--llm {llm_dir} is a VLM; expected a Llama / Mistral dir")
  vcfg, vt = tower.load(vision_dir, select_layer=p.vision.select_layer, keep_cls=p.vision.keep_cls)
  d = _diff(llm_cfg.llm, p.llm, skip=("vocab_size",))
  if d:
    log(f"--llm differs from preset {preset_name}: {'; '.join(d[:4])}: using the checkpoint's")
  d = _diff(vcfg, p.vision, skip=("mean", "std", "select_layer", "keep_cls"))
  if d:
    log(f"--vision differs from preset {preset_name}: {'; '.join(d[:4])}: using the checkpoint's")
  tiler = p.tiler
  if tiler.kind == "s2":
    scales = tuple(s2_scales) if s2_scales else tuple(
        s * vcfg.image_size // p.vision.image_size for s in tiler.scales)
    if scales != tiler.scales:
      log(f"S2 scales {tiler.scales} -> {scales} for a {vcfg.image_size}px tower")
    if scales[0] != vcfg.image_size or any(s % vcfg.image_size for s in scales):
      raise ConversionError(f"S2 scales {scales} must be multiples of the tower's "
                            f"{vcfg.image_size}, starting with it")
    tiler = dataclasses.replace(tiler, scales=scales)
  cfg = p.replace(llm=llm_cfg.llm, vision=vcfg, tiler=tiler, image_token_id=-1)
  srcs = dict(vlm_hf.dir_tensors(llm_dir, cfg))
  srcs.update(vt)
  comps = ("llm", "vision")
  if connector:
    srcs.update(connector_tensors(connector))
    comps += ("connector",)
  params = vlm_hf.import_weights(cfg, srcs, source=f"{llm_dir} + {vision_dir}", dtype=dtype,
                                 components=comps)
  if not connector:
    params["connector"] = init_connector(cfg, seed)
    log(f"new {cfg.connector.kind} connector {cfg.feature_dim} -> {cfg.llm.hidden} (seed {seed})")
  return cfg, params
