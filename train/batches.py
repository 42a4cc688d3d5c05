"""The batches a run's steps take: the data config a run config asks for, the number of steps it
plans, the grain iterator as the loop reads it (agreed on by every process, put on the mesh) and
the periodic held-out pass over the eval data.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import numpy as np

from data.conversation import IGNORE
from data.errors import UserError
from data.pipeline import DataConfig, make_iterator, open_sources, to_global
from train import source
from train.step import make_eval_step
from vlm.sharding import batch_shardings


def data_config(config, model_cfg, *, eval_: bool = False, tokenizer: bool = True) -> DataConfig:
  """tokenizer=False: the batch shapes alone (train.aot plans without the source checkpoint)."""
  kw = {k: v for k, v in config.data.to_dict().items() if v is not None}
  kw["tokenizer_dir"] = source.tokenizer_dir(config) if tokenizer else ""
  for k in ("paths", "pad_buckets"):
    if k in kw:
      kw[k] = tuple(kw[k])
  if "num_epochs" not in kw:
    kw["num_epochs"] = None if config.train.steps else math.ceil(config.train.epochs)
  if eval_:
    kw.update(paths=tuple(config.eval.paths), shuffle=False, num_epochs=1)
    if config.eval.global_batch:
      kw["global_batch"] = config.eval.global_batch
  return DataConfig.from_model(model_cfg, **kw)


def total_steps(config, dcfg: DataConfig) -> int:
  if config.train.steps:
    return int(config.train.steps)
  n = len(open_sources(dcfg))
  steps = int(n * config.train.epochs) // dcfg.global_batch
  if steps < 1:
    raise UserError(f"{n} samples x {config.train.epochs} epochs is less than one global batch "
                    f"of {dcfg.global_batch}")
  return steps


def _pad_to(batch: dict, length: int) -> dict:
  t = batch["input_ids"].shape[1]
  if length == t:
    return batch
  fill = {"labels": IGNORE}
  return {k: np.pad(v, ((0, 0), (0, length - t)), constant_values=fill.get(k, 0))
          if k in ("input_ids", "labels", "positions", "segment_ids") else v
          for k, v in batch.items()}


def samples_in(batch: dict) -> int:
  """Samples in a host batch: each row's highest segment id (pad mode: 1 per filled row; pack
  mode: the samples packed into it)."""
  return int(batch["segment_ids"].max(axis=1).sum())


def agree(batch: Optional[dict]) -> tuple:
  """(batch, samples in the global batch). Several processes step together: all stop when any
  runs out of data (bad samples are skipped per process, so shards can end a batch apart), and in
  pad mode every process pads its rows to the longest bucket any of them drew, so the global
  batch has one shape."""
  n = 0 if batch is None else samples_in(batch)
  if jax.process_count() == 1:
    return batch, n
  from jax.experimental import multihost_utils
  mine = np.array([batch is not None, 0 if batch is None else batch["input_ids"].shape[1], n],
                  np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
  if not every[:, 0].all():
    return None, 0
  return _pad_to(batch, int(every[:, 1].max())), int(every[:, 2].sum())


def fetch(tree):
  """Replicated device values -> numpy on every process (multi-process arrays are not fully
  addressable, so read this process's copy)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x if x.is_fully_addressable else x.addressable_data(0)), tree)


def host_batch(batch: Optional[dict], text_only: bool) -> tuple:
  """(the arrays the step takes, samples in the global batch), agreed on by every process (a
  text-only model gets no all-padding image slots)."""
  if batch is not None:
    batch = {k: v for k, v in batch.items() if k != "skipped" and not (
        text_only and k in ("pixel_values", "image_sizes"))}
  return agree(batch)


class Batches:
  """The iterator as the loop uses it: (host batch, the same on the mesh, iterator state after
  it, samples in the global batch). The copy to the device starts as the batch is taken, while
  the step before it runs."""

  def __init__(self, iterator, text_only: bool, mesh):
    self.it, self.text_only, self.mesh = iterator, text_only, mesh
    self.skipped: dict = {}

  def next(self) -> Optional[tuple]:
    batch = next(self.it, None)
    if batch is not None:
      self.skipped = batch.pop("skipped", {}) or {}
    batch, n = host_batch(batch, self.text_only)
    if batch is None:
      return None
    placed = to_global(batch, self.mesh, batch_shardings(self.mesh, batch))
    return batch, placed, self.it.get_state(), n


class HeldOut:
  """Periodic held-out loss: one pass over the eval data (or its first `batches` batches)."""

  def __init__(self, config, plan, dcfg: DataConfig, mesh):
    self.config, self.plan, self.dcfg, self.mesh = config, plan, dcfg, mesh
    self._steps = {}

  def _step(self, batch):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in self._steps:
      sh = batch_shardings(self.mesh, batch)
      self._steps[key] = (sh, make_eval_step(
          self.plan.model, mesh=self.mesh, trainable_shardings=self.plan.trainable_shardings,
          frozen_shardings=self.plan.frozen_shardings, batch_shardings=sh,
          loss_chunk=self.config.model.loss_chunk, rules=self.plan.rules))
    return self._steps[key]

  def __call__(self, trainable, frozen) -> tuple:
    it = make_iterator(self.dcfg)
    total, count, i = 0.0, 0, 0
    try:
      while not self.config.eval.batches or i < self.config.eval.batches:
        batch, _ = host_batch(next(it, None), self.plan.config.vision is None)
        if batch is None:
          break
        i += 1
        sh, fn = self._step(batch)
        s, n = fetch(fn(trainable, frozen, to_global(batch, self.mesh, sh)))
        total, count = total + float(s), count + int(n)
    finally:
      it.close()
    return total / max(count, 1), count
