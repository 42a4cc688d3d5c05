"""A run's train state, read or initialized straight into the plan's shardings (train/plan.py):
trainable float32 masters, frozen weights in the configured storage dtype; and the config of the
network it exports.

State layout: {"step", "rng" (key data), "trainable", "opt", "nonfinite", "skipped_steps"};
the frozen tree is kept apart (never donated, never checkpointed: it is re-read from the source).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data.conversation import image_position_for
from train.plan import Plan, rng_data
from train.source import place, read_params
from train.trainable import partition
from vlm.config import VLMConfig


def load(config, p: Plan) -> tuple:
  """(state, frozen) on the mesh, from model.init."""
  seed = int(config.model.seed)
  trainable, frozen = partition(read_params(config, p, seed), p.mask)

  def masters(t):
    t = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)
    return t, p.tx.init(t)
  trainable, opt = jax.jit(masters, out_shardings=(p.trainable_shardings, p.opt_shardings))(
      trainable)
  if p.frozen_dtype is not None:
    frozen = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.astype(p.frozen_dtype), t),
                     out_shardings=p.frozen_shardings)(frozen)
  put = lambda x: place(np.asarray(x), p.state_shardings["step"])
  state = {"step": put(jnp.int32(0)),
           "rng": put(rng_data(int(config.train.seed), p.prng_impl)),
           "trainable": trainable, "opt": opt, "nonfinite": put(jnp.int32(0)),
           "skipped_steps": put(jnp.int32(0))}
  return state, frozen


def export_config(p: Plan, data=None) -> VLMConfig:
  """config.json of the trained network: its LoRA and the prompt format `data` (a
  data.pipeline.DataConfig) rendered the samples in, so that chat and VQA runs render as it was
  trained; a stage-1 `plain` run keeps the model's own format."""
  cfg = p.config
  if data is not None and data.template != "plain":
    cfg = cfg.replace(template=data.template, system=data.system,
                      image_position=image_position_for(data.template, data.image_position))
  return cfg
