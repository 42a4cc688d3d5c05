"""A run's train state, read or initialized straight into the plan's shardings (train/plan.py):
model.init's weights (train/source.py says what it is; each process reads its shards of a
checkpoint, a HF dir is read on the host and placed, presets and scratch are initialized on the
device) plus fresh parameters the source lacks (new LoRA adapters), trainable float32 masters,
frozen weights in the configured storage dtype; and the config of the network it exports.

State layout: {"step", "rng" (key data), "trainable", "opt", "nonfinite", "skipped_steps"};
the frozen tree is kept apart (never donated, never checkpointed: it is re-read from the source).
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from data.conversation import image_position_for
from train.plan import Plan, rng_data
from train.source import resolve_init
from train.trainable import partition
from vlm import checkpoint
from vlm.config import VLMConfig
from vlm.model import init_params

log = logging.getLogger(__name__)


def place(x, sharding):
  """A host array -> a global array (every process holds the same value)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x[idx]))


def _check_source(p: Plan, stored: dict):
  """A stored tree (arrays or their metadata) fits the configured network before it is read."""
  want, have = flatten_dict(p.abstract), flatten_dict(stored)
  extra = sorted(set(have) - set(want))
  if extra:
    hint = (" (a LoRA checkpoint: fold the adapters in with `python -m convert merge-lora` or set "
            "model.lora)" if any(k[-1].startswith("lora_") for k in extra) else "")
    raise ValueError(f"model.init has parameters the configured network lacks: "
                     f"{['/'.join(k) for k in extra[:5]]}{hint}")
  for k, v in have.items():
    if tuple(v.shape) != tuple(want[k].shape):
      raise ValueError(f"model.init: {'/'.join(k)} has shape {tuple(v.shape)}, the configured "
                       f"network expects {tuple(want[k].shape)}")


def _read_source(config, p: Plan, seed: int) -> dict:
  init = resolve_init(config.model.init)
  if init == "scratch" or init.startswith("preset:"):   # random init of the trained network
    return jax.jit(lambda k: init_params(p.config, k), out_shardings=p.param_shardings)(
        jax.random.key(seed))
  sh = flatten_dict(p.param_shardings)
  if checkpoint.is_checkpoint(init):   # sharded restore: each process reads its shards
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(os.path.join(os.path.abspath(init), "params"))
    meta = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    meta = getattr(meta, "tree", meta)
    _check_source(p, meta)
    target = unflatten_dict({k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh[k])
                             for k, m in flatten_dict(meta).items()})
    return checkpoint.load(init, target=target)[1]
  from vlm import from_pretrained   # a HF dir
  _, params = from_pretrained(init)
  _check_source(p, params)
  flat = flatten_dict(params)
  return unflatten_dict({k: place(v, sh[k]) for k, v in flat.items()})


def _add_missing(p: Plan, params: dict, seed: int) -> dict:
  """Parameters the trained network has and the source lacks (new LoRA adapters) are freshly
  initialized; the jitted init keeps only those, so XLA never builds the rest."""
  have = flatten_dict(params)
  missing = [k for k in flatten_dict(p.abstract) if k not in have]
  if not missing:
    return params
  log.info("initializing %d new parameters (e.g. %s)", len(missing), "/".join(missing[0]))
  sh = flatten_dict(p.param_shardings)

  def fresh(key):
    flat = flatten_dict(init_params(p.config, key))
    return {"/".join(k): flat[k] for k in missing}
  new = jax.jit(fresh, out_shardings={"/".join(k): sh[k] for k in missing})(
      jax.random.key(seed + 1))
  return unflatten_dict({**have, **{k: new["/".join(k)] for k in missing}})


def read_params(config, p: Plan, seed: int) -> dict:
  """Every parameter of the trained network on the mesh: model.init's, plus fresh new ones."""
  return _add_missing(p, _read_source(config, p, seed), seed)


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
