"""Static-shape batches from variable-length samples, as grain IterDatasets.

A sample is {"input_ids": int32[T], "labels": int32[T], "pixel_values": uint8[n, ...]} (plus
`image_sizes` int32[n, 4] for anyres). Both modes emit `input_ids`, `labels` (-100 where not
trained), `positions`, `segment_ids` (0 = padding) [B, L] and images padded with zero images to a
fixed count per row:
- `LengthGroupedBatch`: one sample per row; each window of `window` batches is sorted by length and
  cut into batches padded to the smallest bucket that fits (few distinct shapes, little padding).
- `packed_batches`: grain's first-fit packing of whole samples into rows of `max_len` tokens and
  `max_images` images; segment ids 1..k per sample, positions restart at 0 for every sample.
Both save and restore their state exactly (JSON-serializable dicts).
"""
from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import grain.python as gp
import numpy as np

from data.conversation import IGNORE

TEXT = ("input_ids", "labels")
IMAGE = ("pixel_values", "image_sizes")


def pad_batch(samples: Sequence[dict], batch_size: int, length: int, n_images: int) -> dict:
  """One sample per row, tokens padded to `length`, images to `n_images` (zeros); rows past the
  samples are all padding. Each array is written once, straight into the batch."""
  out = {"input_ids": np.zeros((batch_size, length), np.int32),
         "labels": np.full((batch_size, length), IGNORE, np.int32),
         "positions": np.zeros((batch_size, length), np.int32),
         "segment_ids": np.zeros((batch_size, length), np.int32)}
  for k in IMAGE:
    if k in samples[0]:
      x = samples[0][k]
      out[k] = np.zeros((batch_size, n_images, *x.shape[1:]), x.dtype)
  for r, s in enumerate(samples):
    t = len(s["input_ids"])
    out["input_ids"][r, :t], out["labels"][r, :t] = s["input_ids"], s["labels"]
    out["positions"][r, :t], out["segment_ids"][r, :t] = np.arange(t), 1
    for k in IMAGE:
      if k in out:
        out[k][r, :len(s[k])] = s[k]
  return out


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"sample of {length} tokens exceeds the largest bucket {buckets[-1]}")


class _Ahead:
  """A call run in a daemon thread (an abandoned read never blocks interpreter exit)."""

  def __init__(self, fn):
    self._out = (None, None)
    self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
    self._thread.start()

  def _run(self, fn):
    try:
      self._out = (fn(), None)
    except BaseException as e:  # noqa: BLE001 - re-raised in the reading thread
      self._out = (None, e)

  def result(self):
    self._thread.join()
    value, err = self._out
    if err is not None:
      raise err
    return value


class _LengthGroupedIterator(gp.DatasetIterator):
  """Reads a window of samples, sorts it by length, emits its batches in a seeded order.

  While a window's batches are consumed, the next window is read in a background thread: read
  at once, a window of 32 batches of S2 images takes seconds that the accelerator would otherwise
  wait (bench/train_e2e.py). Two windows of samples are held in host memory. A parent that
  counts skipped samples (data.pipeline's `counts`) is read at the end of each window read, and
  every batch of the window reports that snapshot as "skipped": the same whichever thread reads.

  State = (parent state at the window's start, window number, batches already emitted): restoring
  re-reads that one window, which regroups identically."""

  def __init__(self, parent, *, batch_size, buckets, window, n_images, seed, drop_remainder):
    super().__init__(parent)
    self._b, self._buckets, self._window = batch_size, list(buckets), window
    self._n_images, self._seed, self._drop = n_images, seed, drop_remainder
    self._start_state = self._parent.get_state()
    self._window_no, self._emitted, self._batches, self._ahead = 0, 0, None, None

  def _read(self) -> tuple:
    """(parent state at the window's start, the window's samples, skip counts at its end);
    only one thread reads at a time."""
    start, samples = self._parent.get_state(), []
    for s in self._parent:
      samples.append(s)
      if len(samples) == self._b * self._window:
        break
    counts = getattr(self._parent, "counts", None)
    return start, samples, None if counts is None else dict(counts)

  def _fill(self):
    ahead, self._ahead = self._ahead, None
    self._start_state, samples, self._skipped = ahead.result() if ahead else self._read()
    if len(samples) == self._b * self._window:  # not the last window: read the next one now
      self._ahead = _Ahead(self._read)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
    groups = [order[i:i + self._b] for i in range(0, len(order), self._b)]
    if groups and len(groups[-1]) < self._b and self._drop:
      groups.pop()
    rng = np.random.default_rng([self._seed, self._window_no])
    self._batches = [groups[i] for i in rng.permutation(len(groups))], samples

  def __next__(self) -> dict:
    if self._batches is None:
      self._fill()
    groups, samples = self._batches
    if self._emitted >= len(groups):
      if len(samples) < self._b * self._window:   # the parent ran dry
        raise StopIteration
      self._window_no, self._emitted = self._window_no + 1, 0
      self._fill()
      groups, samples = self._batches
      if not groups:
        raise StopIteration
    group = groups[self._emitted]
    self._emitted += 1
    length = bucket_for(max(len(samples[i]["input_ids"]) for i in group), self._buckets)
    batch = pad_batch([samples[i] for i in group], self._b, length, self._n_images)
    if self._skipped is not None:
      batch["skipped"] = dict(self._skipped)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._start_state, "window": self._window_no, "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    if self._ahead is not None:  # let the read in flight end before the parent is moved
      try:
        self._ahead.result()
      except Exception:  # noqa: BLE001 - its window is discarded anyway
        pass
      self._ahead = None
    self._parent.set_state(state["parent"])
    self._window_no, self._emitted = state["window"], state["emitted"]
    self._batches = None   # refilled from the restored parent on the next call


class LengthGroupedBatch(gp.IterDataset):
  """Length-grouped, bucket-padded batches (see module docstring)."""

  def __init__(self, parent, *, batch_size: int, buckets: Sequence[int], window: int = 32,
               n_images: int = 1, seed: int = 0, drop_remainder: bool = True):
    super().__init__(parent)
    if not buckets or list(buckets) != sorted(buckets):
      raise ValueError(f"buckets must be a non-empty ascending list, got {buckets}")
    self._kw = dict(batch_size=batch_size, buckets=buckets, window=window, n_images=n_images,
                    seed=seed, drop_remainder=drop_remainder)

  def __iter__(self):
    return _LengthGroupedIterator(self._parent.__iter__(), **self._kw)


def _rename_packed(row: dict) -> dict:
  out = {k: row[k] for k in (*TEXT, *IMAGE) if k in row}
  out["segment_ids"] = row["input_ids_segment_ids"]
  out["positions"] = row["input_ids_positions"]
  return out


def packed_batches(parent: gp.IterDataset, *, batch_size: int, max_len: int, max_images: int,
                   bins: Optional[int] = None, anyres: bool = False,
                   seed: int = 0) -> gp.IterDataset:
  """First-fit packing (grain) of whole samples into rows, then batches of `batch_size` rows
  (`max_images` 0: text only, no images in the batch).

  A sample longer than `max_len` or with more than `max_images` images cannot be packed and must
  be filtered out before (the pipeline counts it as 'too_long' / 'too_many_images')."""
  length = {"input_ids": max_len, "labels": max_len}
  padding = {"input_ids": 0, "labels": IGNORE}
  if max_images:   # 0: text-only rows carry no images
    for k in IMAGE if anyres else IMAGE[:1]:
      length[k], padding[k] = max_images, 0
  ds = gp.experimental.FirstFitPackIterDataset(
      parent, length_struct=length, padding_struct=padding,
      num_packing_bins=bins or batch_size, seed=seed, shuffle_bins=True)
  return ds.map(_rename_packed).batch(batch_size, drop_remainder=True)
