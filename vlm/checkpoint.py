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


def save(path, config: VLMConfig, params, tokenizer_dir: Optional[str] = None):
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json())
  target = os.path.join(path, "params")
  if os.path.exists(target):
    shutil.rmtree(target)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
  if tokenizer_dir is not None and os.path.abspath(tokenizer_dir) != os.path.join(path, "tokenizer"):
    shutil.copytree(tokenizer_dir, os.path.join(path, "tokenizer"), dirs_exist_ok=True)


def load_config(path) -> VLMConfig:
  with open(os.path.join(path, "config.json")) as f:
    return VLMConfig.from_dict(json.load(f))


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
