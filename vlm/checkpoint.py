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

from data.errors import load_json
from vlm.config import VLMConfig


def is_checkpoint(path) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.exists(
      os.path.join(path, "config.json"))


def resolve(path: str) -> str:
  """The model a path names: a checkpoint dir is itself, a training workdir (what train.main
  writes, and takes as model.init) is its final model WORKDIR/final; anything else passes through
  unchanged (HF dirs, "scratch", "preset:NAME"). A workdir whose run has not written final/ yet,
  or a chained run's workdir, raises FileNotFoundError saying which it is."""
  if not path or is_checkpoint(path) or not os.path.isdir(path):
    return path
  final = os.path.join(path, "final")
  if os.path.isdir(final):
    return final
  if os.path.isdir(os.path.join(path, "checkpoints")):
    raise FileNotFoundError(f"{path} is a training workdir without a final model: its run has "
                            "not finished (rerun the train.main command to resume it)")
  stages = sorted(os.path.join(path, d, "final") for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d, "final")))
  if stages and not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path} is a chained training run: name one of its stages' models "
                            f"({', '.join(stages)})")
  return path


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
