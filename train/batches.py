"""The batches a run's steps take: the data config a run config asks for, the number of steps it
plans, the grain iterator as the loop reads it (agreed on by every process, put on the mesh, with
the run's running totals of samples, tokens and time in its saved state, so that a resumed run
counts on from its checkpoint) and the periodic held-out pass over the eval data.
"""
from __future__ import annotations

import math
import time
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


TOTALS = ("samples", "tokens", "trained_tokens")


def counts(batch: Optional[dict]) -> np.ndarray:
  """TOTALS of a host batch: samples, real (non-padding) tokens and trained tokens, the tokens
  counted as train/step.py counts them (segment ids > 0; labels after the first position that
  are not IGNORE)."""
  if batch is None:
    return np.zeros(len(TOTALS), np.int64)
  real = (batch["segment_ids"] > 0).sum() if "segment_ids" in batch else batch["labels"].size
  return np.array([samples_in(batch), real, (batch["labels"][:, 1:] != IGNORE).sum()], np.int64)


def agree(batch: Optional[dict]) -> tuple:
  """(batch, TOTALS of the global batch). Several processes step together: all stop when any
  runs out of data (bad samples are skipped per process, so shards can end a batch apart), and in
  pad mode every process pads its rows to the longest bucket any of them drew, so the global
  batch has one shape."""
  n = counts(batch)
  if jax.process_count() == 1:
    return batch, n
  from jax.experimental import multihost_utils
  mine = np.array([batch is not None, 0 if batch is None else batch["input_ids"].shape[1], *n],
                  np.int32)   # (a batch's counts fit; jax gathers 32-bit integers)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine))
  if not every[:, 0].all():
    return None, counts(None)
  return _pad_to(batch, int(every[:, 1].max())), every[:, 2:].sum(axis=0)


def fetch(tree):
  """Replicated device values -> numpy on every process (multi-process arrays are not fully
  addressable, so read this process's copy)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x if x.is_fully_addressable else x.addressable_data(0)), tree)


def host_batch(batch: Optional[dict], text_only: bool) -> tuple:
  """(the arrays the step takes, TOTALS of the global batch), agreed on by every process (a
  text-only model gets no all-padding image slots)."""
  if batch is not None:
    batch = {k: v for k, v in batch.items() if k != "skipped" and not (
        text_only and k in ("pixel_values", "image_sizes"))}
  return agree(batch)


class Batches:
  """The iterator as the loop uses it: (host batch, the same on the mesh, the state after it,
  samples in the global batch). The copy to the device starts as the batch is taken, while the
  step before it runs.

  The state (what a checkpoint saves and set_state restores) is the iterator's plus the run's
  totals up to that batch: TOTALS over every batch taken since the run began, and the seconds it
  ran (`t0`: when this process's run started; `before`: the seconds of the runs before it)."""

  def __init__(self, iterator, text_only: bool, mesh, t0: Optional[float] = None):
    self.it, self.text_only, self.mesh = iterator, text_only, mesh
    self.t0 = time.time() if t0 is None else t0
    self.skipped: dict = {}
    self.totals = dict.fromkeys(TOTALS, 0)
    self.before = 0.0

  def next(self) -> Optional[tuple]:
    batch = next(self.it, None)
    if batch is not None:
      self.skipped = batch.pop("skipped", {}) or {}
    batch, n = host_batch(batch, self.text_only)
    if batch is None:
      return None
    self.totals = {k: self.totals[k] + int(v) for k, v in zip(TOTALS, n)}
    placed = to_global(batch, self.mesh, batch_shardings(self.mesh, batch))
    return batch, placed, self.get_state(), int(n[0])

  def seconds(self) -> float:
    """Seconds the run has taken so far, its earlier runs included."""
    return self.before + time.time() - self.t0

  def get_state(self) -> dict:
    return {"iterator": self.it.get_state(),
            "totals": {**self.totals, "seconds": round(self.seconds(), 3)}}

  def set_state(self, state: dict) -> None:
    if set(state) != {"iterator", "totals"}:   # a checkpoint from before the totals were saved
      self.it.set_state(state)
      return
    self.it.set_state(state["iterator"])
    self.totals = {k: int(state["totals"].get(k, 0)) for k in TOTALS}
    self.before = float(state["totals"].get("seconds", 0.0))


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
