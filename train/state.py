"""The model a run starts from and its train state, planned from shapes before any allocation.

`plan()` resolves the network (checkpoint dir, HF dir, preset or scratch architecture, plus LoRA /
dtype / remat / attention overrides), splits its parameter paths into trainable and frozen with
vlm.lora, and derives every sharding (optimizer state sharded like its parameters) from
`jax.eval_shape`, so a 13B recipe can be checked on a laptop. `load()` then reads or initializes
the weights straight into those shardings: trainable float32 masters, frozen weights in the
configured storage dtype.

State layout: {"step", "rng" (key data), "trainable", "opt", "nonfinite", "skipped_steps"};
the frozen tree is kept apart (never donated, never checkpointed: it is re-read from the source).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec as P

from data.conversation import image_position_for
from data.errors import UserError
from data.tokenizer import load_tokenizer
from train import optimizer
from vlm import checkpoint, lora
from vlm.config import LoraConfig, Runtime, VLMConfig, preset
from vlm.model import DTYPES, VLM, abstract_params, init_params
from vlm.sharding import AXES, DEFAULT_RULES, make_mesh, shardings as tree_shardings

log = logging.getLogger(__name__)


def resolve_init(init: str) -> str:
  """'scratch' and 'preset:NAME' as they are; a path as serve.workdir.resolve reads it: a stage-1
  workdir stands for its final checkpoint (`WORKDIR/final`), an unfinished one is an error. A path
  that does not exist is kept (check_init reports it; plan() falls back to model.preset)."""
  if init == "scratch" or init.startswith("preset:") or not os.path.exists(init):
    return init
  from serve import workdir
  return workdir.resolve(init)


def check_init(config):
  """model.init exists: a missing directory is reported as such, before a tokenizer or a config
  is looked for in it (plan() alone falls back to model.preset for dry runs)."""
  init = config.model.init
  if not init:
    raise UserError("model.init is empty: set it to a checkpoint dir, a training workdir, a HF "
                    "model dir, 'preset:NAME' or 'scratch'")
  if init == "scratch" or init.startswith("preset:"):
    return
  if not os.path.exists(init):
    raise UserError(f"model.init: directory not found ({init}); train the stage it starts from "
                    "first, or point --config.model.init at a checkpoint")
  resolve_init(init)   # a workdir whose run has not finished says so


def tokenizer_dir(config) -> str:
  """data.tokenizer_dir, else the tokenizer that ships with the source checkpoint."""
  if config.data.tokenizer_dir:
    return config.data.tokenizer_dir
  init = resolve_init(config.model.init)
  for d in (os.path.join(init, "tokenizer"), init):
    if os.path.exists(os.path.join(d, "tokenizer_config.json")):
      return d
  raise UserError(f"no tokenizer: set data.tokenizer_dir (model.init {init!r} has none)")


def source_config(config) -> VLMConfig:
  """The network as stored at model.init (no training overrides)."""
  m = config.model
  init = resolve_init(m.init)
  if init == "scratch":
    arch = VLMConfig.from_dict(m.arch.to_dict() if hasattr(m.arch, "to_dict") else dict(m.arch))
    if arch.llm.vocab_size <= 0 or arch.image_token_id < 0:   # take them from the tokenizer
      tok = load_tokenizer(tokenizer_dir(config))
      vocab = arch.llm.vocab_size if arch.llm.vocab_size > 0 else len(tok)
      image = (arch.image_token_id if arch.image_token_id >= 0 else
               tok.convert_tokens_to_ids("<image>"))
      arch = arch.replace(llm=dataclasses.replace(arch.llm, vocab_size=vocab), image_token_id=image)
    return arch
  if init.startswith("preset:"):
    return preset(init.split(":", 1)[1])
  if checkpoint.is_checkpoint(init):
    return checkpoint.load_config(init)
  if os.path.exists(os.path.join(init, "config.json")):
    from convert import hf
    return hf.dir_config(init)   # as `convert import --from hf` reads it, prompt format included
  if m.get("preset"):   # the source is not here (e.g. a dry run): plan from the named shape
    return preset(m.preset)
  raise FileNotFoundError(f"model.init {m.init!r}: not a checkpoint dir, HF dir, 'preset:NAME' "
                          "or 'scratch'")


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
  mask = lora.select(abstract, tuple(config.trainable))
  n_train = sum(math.prod(v.shape) for k, v in flatten_dict(abstract).items()
                if flatten_dict(mask)[k])
  if not n_train:
    raise ValueError(f"trainable patterns {tuple(config.trainable)} match no parameter; paths look "
                     f"like {sorted('/'.join(k) for k in flatten_dict(abstract))[:6]}")
  trainable_sh, frozen_sh = lora.partition(shard, mask)
  trainable_abs, _ = lora.partition(abstract, mask)
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
              frozen_sh, DTYPES[fd] if fd else None, tx, sched, opt_sh, state_sh, mesh, impl, rules)


def abstract_state(p: Plan) -> tuple:
  """(state, frozen) as ShapeDtypeStructs with shardings: what `load` would allocate."""
  sds = lambda x, s, dt=None: jax.ShapeDtypeStruct(x.shape, dt or x.dtype, sharding=s)
  trainable, frozen = lora.partition(p.abstract, p.mask)
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


# --- reading / initializing weights --------------------------------------------------------------

def _place(x, sharding):
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
  import convert  # noqa: F401  (an init may be a HF dir: registers its reader)
  from vlm import from_pretrained
  _, params = from_pretrained(init)
  _check_source(p, params)
  flat = flatten_dict(params)
  return unflatten_dict({k: _place(v, sh[k]) for k, v in flat.items()})


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


def load(config, p: Plan) -> tuple:
  """(state, frozen) on the mesh, from model.init."""
  seed = int(config.model.seed)
  params = _add_missing(p, _read_source(config, p, seed), seed)
  trainable, frozen = lora.partition(params, p.mask)

  def masters(t):
    t = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)
    return t, p.tx.init(t)
  trainable, opt = jax.jit(masters, out_shardings=(p.trainable_shardings, p.opt_shardings))(
      trainable)
  if p.frozen_dtype is not None:
    frozen = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.astype(p.frozen_dtype), t),
                     out_shardings=p.frozen_shardings)(frozen)
  put = lambda x: _place(np.asarray(x), p.state_shardings["step"])
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
