"""This project's checkpoint directory: config.json (VLMConfig), params/ (orbax), tokenizer/.

Everything trainable lives in the one params tree (vision, connector, LLM, LoRA). Training runs add
train_state/ beside it (train/checkpoints.py).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlm.config import VLMConfig
from vlm.damage import DamagedCheckpoint, read_error, rebuild_hint, unreadable


def is_checkpoint(path) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.exists(
      os.path.join(path, "config.json"))


def looks_like_checkpoint(path) -> bool:
  """A dir of this project, whole or damaged: params/, or a config.json of ours (its "llm" /
  "vision" keys; a HF config has a model_type instead)."""
  if os.path.isdir(os.path.join(path, "params")):
    return True
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      conf = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(conf, dict) and "model_type" not in conf and bool({"llm", "vision"} & set(conf))


def check(path):
  """Raise DamagedCheckpoint when checkpoint dir `path` misses config.json or params/ or has an
  unreadable params/."""
  missing = [f for f in ("config.json", "params") if not os.path.exists(os.path.join(path, f))]
  problem = (f"{path} has no {' and no '.join(missing)}" if missing else
             unreadable(os.path.join(path, "params")))
  if problem:
    raise DamagedCheckpoint(f"damaged checkpoint: {problem}; {rebuild_hint(path)}")


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
  """config.json; a malformed one is a JSONDecodeError naming the file (commands print it as
  one line)."""
  name = os.path.join(path, "config.json")
  with open(name, encoding="utf-8") as f:
    text = f.read()
  try:
    return VLMConfig.from_dict(json.loads(text))
  except json.JSONDecodeError as e:
    raise json.JSONDecodeError(f"{e.msg} in {name}", e.doc, e.pos) from None


def load(path, target=None):
  """(config, params). `target`: a tree of jax.ShapeDtypeStruct with shardings to restore sharded
  (each process reads only its shards); default restores to host numpy-backed arrays."""
  check(path)
  cfg = load_config(path)
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      meta = ckptr.metadata(os.path.join(os.path.abspath(path), "params"))
      tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
          tree)
    try:
      params = ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)
    except Exception as e:  # noqa: BLE001 - re-raised unless tensorstore could not read a file
      bad = read_error(e)
      if bad is None:
        raise
      raise DamagedCheckpoint(f"damaged checkpoint: {path}/params cannot be read ({bad}); "
                              f"{rebuild_hint(path)}") from e
  return cfg, params
