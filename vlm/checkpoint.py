"""This project's checkpoint directory: config.json (VLMConfig), params/ (orbax), tokenizer/.

Everything trainable lives in the one params tree (vision, connector, LLM, LoRA). Training runs add
train_state/ beside it (train/checkpoints.py).
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from data.errors import UserError
from data.jsonfile import load_json
from vlm.config import VLMConfig


def is_checkpoint(path) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.exists(
      os.path.join(path, "config.json"))


def resolve(path) -> str:
  """The model dir `path` stands for: a checkpoint dir of this project or a HF model dir as is; a
  `train.main` workdir for the model it wrote, as model.init reads a workdir: WORKDIR/final, or for
  a chained config (configs/demo.py) the last stage's WORKDIR/<stage>/final (the last stage is the
  one no other stage starts from). Anything else is a UserError saying what the path holds."""
  path = os.fspath(path)
  if is_checkpoint(path) or os.path.isfile(os.path.join(path, "config.json")):
    return path
  if not os.path.isdir(path):
    raise UserError(f"no such checkpoint dir or training workdir: {path}")
  final = os.path.join(path, "final")
  if is_checkpoint(final):
    return final
  if os.path.isfile(os.path.join(path, "train_config.json")):
    raise UserError(_unfinished(path, path, "the run"))
  stages = {d: os.path.join(path, d) for d in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, d, "train_config.json"))}
  inits = [load_json(os.path.join(d, "train_config.json")).get("model", {}).get("init")
           for d in stages.values()]
  starts = {os.path.abspath(i) for i in inits if isinstance(i, str) and i}
  last = [n for n, d in stages.items()
          if not {os.path.abspath(d), os.path.abspath(os.path.join(d, "final"))} & starts]
  if len(last) == 1:
    d = stages[last[0]]
    if is_checkpoint(os.path.join(d, "final")):
      return os.path.join(d, "final")
    raise UserError(_unfinished(path, d, f"its last stage {last[0]!r}"))
  raise UserError(f"{path} is neither a checkpoint of this project (config.json + params/), a HF "
                  "model dir (config.json + weights) nor a train.main workdir (final/, or "
                  "STAGE/final of a chained config)")


def _unfinished(workdir: str, stage_dir: str, what: str) -> str:
  ckpts = os.path.join(stage_dir, "checkpoints")
  steps = sorted(int(s) for s in (os.listdir(ckpts) if os.path.isdir(ckpts) else ()) if s.isdigit())
  done = (f"its newest train checkpoint, step {steps[-1]}, holds the trained weights and optimizer "
          "state, not a model" if steps else "no checkpoint yet")
  final = os.path.join(stage_dir, "final")
  return (f"training workdir {workdir}: {what} has not finished (no {final}; {done}); rerun the "
          "same train.main command to finish it")


# orbax files are split into pieces of this size so a save never buffers a whole 8B tree.
SAVE_FILE_BYTES = 16 * 2**20


def save_params(path, params):
  """Write a params tree (orbax, OCDBT). Host numpy trees are written without orbax's defensive
  deep copy (an 8B import would otherwise peak at ~3x its size); device arrays, sharded or not,
  go through the standard handler, each process writing its own shards."""
  path = os.path.abspath(path)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  _barrier("medvlm_checkpoint_rm")
  leaves = jax.tree_util.tree_leaves(params)
  if all(isinstance(x, np.ndarray) for x in leaves):
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(path, args=ocp.args.PyTreeSave(params,
                                                ocdbt_target_data_file_size=SAVE_FILE_BYTES))
    return
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)


def save(path, config: VLMConfig, params, tokenizer_dir: Optional[str] = None):
  """config.json + params/ (+ a copy of tokenizer_dir as tokenizer/). Every process writes its
  params shards; process 0 alone writes the small files."""
  path = os.path.abspath(path)
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      f.write(config.to_json())
  save_params(os.path.join(path, "params"), params)
  if lead and tokenizer_dir is not None and (
      os.path.abspath(tokenizer_dir) != os.path.join(path, "tokenizer")):
    shutil.copytree(tokenizer_dir, os.path.join(path, "tokenizer"), dirs_exist_ok=True)
  _barrier("medvlm_checkpoint_done")


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def load_config(path) -> VLMConfig:
  return VLMConfig.from_dict(load_json(os.path.join(path, "config.json")))


def load(path, target=None):
  """(config, params). `target`: a tree of jax.ShapeDtypeStruct with shardings to restore sharded
  (each process reads only its shards); default restores to host numpy-backed arrays."""
  cfg = load_config(path)
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      meta = ckptr.metadata(os.path.join(os.path.abspath(path), "params"))
      tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
          tree)
    params = ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)
  return cfg, params
