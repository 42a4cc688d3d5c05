"""Where a run's weights come from: model.init resolved (a checkpoint dir, a training workdir, a HF
dir, 'preset:NAME' or 'scratch'), the network and tokenizer stored there, and its weights read
straight into the plan's shardings (each process reads its shards of a checkpoint; a HF dir is
read on the host and placed; presets and scratch are initialized on the device), with the
parameters the source lacks (new LoRA adapters) freshly initialized.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from data.errors import UserError
from data.tokenizer import load_tokenizer
from vlm import checkpoint
from vlm.config import VLMConfig, preset
from vlm.model import init_params

if TYPE_CHECKING:
  from train.plan import Plan

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
  import convert  # noqa: F401  (an init may be a HF dir: registers its reader)
  from vlm import from_pretrained
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
