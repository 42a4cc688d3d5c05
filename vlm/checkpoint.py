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


def is_checkpoint(path) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.exists(
      os.path.join(path, "config.json"))


class DamagedCheckpoint(ValueError):
  """A checkpoint dir (or a training step) whose files cannot be read: commands report it as one
  line saying what is missing and how to rebuild it."""


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


def unreadable(path) -> Optional[str]:
  """What makes the orbax dir `path` unreadable (None when nothing does): a missing or malformed
  metadata file, or an OCDBT value whose data file is gone or too short. Reads one byte of every
  value, so a deleted or truncated data file is found without reading the arrays."""
  import tensorstore as ts
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    return f"{path} is missing"
  for name in ("_METADATA", "_CHECKPOINT_METADATA"):
    meta = os.path.join(path, name)
    if os.path.exists(meta):
      try:
        with open(meta, encoding="utf-8") as f:
          json.load(f)
      except ValueError as e:
        return f"{meta} is malformed ({e})"
  if not os.path.exists(os.path.join(path, "manifest.ocdbt")):
    return None if os.path.exists(os.path.join(path, "_METADATA")) else f"{path}/_METADATA is missing"
  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()
    keys = kv.list().result()
  except ValueError as e:
    return f"the OCDBT index in {path} cannot be read ({_first_line(e)})"
  reads = [(k, kv.read(k, byte_range=slice(-1, None))) for k in keys]
  for key, r in reads:
    try:
      got = r.result()
    except ValueError as e:
      return f"{_data_file(path, e)} is truncated (array piece {key.decode()} is cut off)"
    if got.state != "value" or len(got.value) != 1:
      return f"{_data_file(path)} is missing (array piece {key.decode()})"
  return None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _data_file(path: str, error: Optional[BaseException] = None) -> str:
  """The data file a tensorstore read error points at (by the size it reports), else where the
  data files are."""
  import glob
  import re
  size = re.search(r"for value of size (\d+)", str(error or ""))
  if size:
    found = [f for f in glob.glob(os.path.join(path, "**", "d", "*"), recursive=True)
             if os.path.getsize(f) == int(size.group(1))]
    if len(found) == 1:
      return found[0]
  return f"a data file under {path}/ocdbt.process_*/d"


def rebuild_hint(path) -> str:
  """The command that writes model dir `path` again: a training run's final/ is rewritten by
  rerunning its train.main command (it resumes from the newest checkpoint); anything else by the
  convert command that made it."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.basename(os.path.abspath(path)) == "final" and any(
      os.path.exists(os.path.join(parent, f)) for f in ("train_config.json", "checkpoints")):
    return (f"delete {path} and rerun the python -m train.main command of {parent}: it resumes "
            "from its newest checkpoint and writes the model again")
  return ("write it again with the command that made it (python -m convert import ... / "
          "python -m convert merge-lora ...)")


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
    params = ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)
  return cfg, params
