"""A run's plan: everything about its state that follows from shapes alone, before any allocation.

`plan()` resolves the network (the source's, train/source.py, plus LoRA / dtype / remat /
attention overrides), splits its parameter paths into trainable and frozen (train/trainable.py)
and derives every sharding (optimizer state sharded like its parameters) from `jax.eval_shape`,
so a 13B recipe can be checked on a laptop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding, PartitionSpec as P

from data.errors import UserError
from train import optimizer
from train.source import source_config
from train.trainable import partition, select
from vlm.config import LoraConfig, Runtime, VLMConfig
from vlm.model import VLM, abstract_params
from vlm.sharding import AXES, DEFAULT_RULES, make_mesh, shardings as tree_shardings


def train_config(config, src: VLMConfig) -> VLMConfig:
  """The network trained: the source plus LoRA adapters."""
  m = config.model
  out = src
  if m.lora.rank:
    out = out.replace(lora=LoraConfig(rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                                      targets=tuple(m.lora.targets),
                                      vision_targets=tuple(m.lora.vision_targets)))
  return out


def train_runtime(config) -> Runtime:
  """How the run computes (model.dtype / remat / vision_remat / attention): never saved."""
  m = config.model
  return Runtime(dtype=m.dtype, remat=m.remat, vision_remat=m.vision_remat, attention=m.attention)


@dataclasses.dataclass
class Plan:
  """Everything about a run's state that follows from shapes alone."""
  source: VLMConfig
  config: VLMConfig
  model: VLM
  mask: Any                 # bool tree over all params: trainable?
  abstract: Any             # ShapeDtypeStruct tree of all params (float32)
  param_shardings: Any
  trainable_shardings: Any
  frozen_shardings: Any
  frozen_dtype: Any         # None: keep the stored dtype
  tx: Any
  schedule: Any
  opt_shardings: Any
  state_shardings: dict
  mesh: Any
  prng_impl: str = "threefry2x32"  # of the dropout key (train.prng_impl)
  rules: tuple = DEFAULT_RULES     # logical axis -> mesh axes, weights and activations


# Key data words per PRNG implementation: train/step.py tells them apart by this length.
RNG_WORDS = {"threefry2x32": 2, "rbg": 4}


def rng_data(seed: int, impl: str):
  """The stored dropout key: jax key data of `impl` (plan() checked the name; 'rbg': bits from
  XLA's RngBitGenerator, Philox on GPUs, instead of threefry's integer rounds in every mask)."""
  return jax.random.key_data(jax.random.key(seed, impl=impl))


def mesh_for(config):
  """The run's ('data', 'fsdp', 'tensor') mesh from config.mesh (shape, num_devices)."""
  n = int(config.mesh.num_devices or 0)
  return make_mesh(tuple(config.mesh.shape), jax.devices()[:n] if n else None)


def sharding_rules(config) -> tuple:
  """config.sharding_rules: (logical name, None | mesh axis | tuple of mesh axes) pairs."""
  out = []
  for rule in config.get("sharding_rules", DEFAULT_RULES):
    name, axes = rule if len(rule) == 2 else (rule, "?")
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    if not set(axes if isinstance(axes, tuple) else (axes,)) <= set(AXES) | {None}:
      raise UserError(f"sharding_rules: {rule!r} is not a (logical name, mesh axes) pair over "
                      f"the mesh axes {AXES}")
    out.append((name, axes))
  return tuple(out)


def plan(config, mesh, total_steps: int) -> Plan:
  src = source_config(config)
  cfg = train_config(config, src)
  boxed = abstract_params(cfg, boxed=True)
  abstract = nn.unbox(boxed)
  rules = sharding_rules(config)
  shard = tree_shardings(boxed, mesh, rules)
  mask = select(abstract, tuple(config.trainable))
  n_train = sum(math.prod(v.shape) for k, v in flatten_dict(abstract).items()
                if flatten_dict(mask)[k])
  if not n_train:
    raise ValueError(f"trainable patterns {tuple(config.trainable)} match no parameter; paths look "
                     f"like {sorted('/'.join(k) for k in flatten_dict(abstract))[:6]}")
  trainable_sh, frozen_sh = partition(shard, mask)
  trainable_abs, _ = partition(abstract, mask)
  tx, sched = optimizer.make(config.optim, total_steps, trainable_abs)
  replicated = NamedSharding(mesh, P())
  opt_abs = jax.eval_shape(tx.init, trainable_abs)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, trainable_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = {"step": replicated, "rng": replicated, "trainable": trainable_sh, "opt": opt_sh,
              "nonfinite": replicated, "skipped_steps": replicated}
  fd = config.model.frozen_dtype
  impl = config.train.get("prng_impl", "threefry2x32")
  if impl not in RNG_WORDS:
    raise ValueError(f"train.prng_impl {impl!r} not in {sorted(RNG_WORDS)}")
  return Plan(src, cfg, VLM(cfg, train_runtime(config)), mask, abstract, shard, trainable_sh,
              frozen_sh, jnp.dtype(fd) if fd else None, tx, sched, opt_sh, state_sh, mesh, impl, rules)


def abstract_state(p: Plan) -> tuple:
  """(state, frozen) as ShapeDtypeStructs with shardings: what state.load would allocate."""
  sds = lambda x, s, dt=None: jax.ShapeDtypeStruct(x.shape, dt or x.dtype, sharding=s)
  trainable, frozen = partition(p.abstract, p.mask)
  trainable = jax.tree_util.tree_map(lambda x, s: sds(x, s, jnp.float32), trainable,
                                     p.trainable_shardings)
  frozen = jax.tree_util.tree_map(lambda x, s: sds(x, s, p.frozen_dtype), frozen,
                                  p.frozen_shardings)
  opt = jax.tree_util.tree_map(sds, jax.eval_shape(p.tx.init, trainable), p.opt_shardings)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=p.state_shardings["step"])
  state = {"step": scalar(jnp.int32),
           "rng": jax.ShapeDtypeStruct((RNG_WORDS[p.prng_impl],), jnp.uint32,
                                       sharding=p.state_shardings["rng"]),
           "trainable": trainable, "opt": opt, "nonfinite": scalar(jnp.int32),
           "skipped_steps": scalar(jnp.int32)}
  return state, frozen
