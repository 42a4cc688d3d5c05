"""Concurrent requests -> batched generate calls, through one bounded queue.

One worker thread owns the Generator (JAX work never runs on the server's event loop). Requests
wait in a queue with a bound (a full queue is the server's 503). Each generate call takes the
oldest waiting request and every waiting request that can share its batch, i.e. has the same
sampling parameters (`api.Sampling`), up to `max_batch` rows; requests that arrive while a batch
runs wait for the next one, and a request that finds the worker idle waits `window` seconds for
company. Within a batch every row keeps its own max_tokens (Generator `limits`), streams its own
text, and stops being fed when its client goes away (Generator `cancel`).

This is batching by arrival, not continuous batching: a batch runs until its longest row ends,
because the decode cache advances all rows at one position (serve/generate.py); rows that end
early idle until then.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Optional

from serve.generate import GenerationConfig, Generator
from serve.prompt import Prompt

log = logging.getLogger(__name__)


class QueueFull(Exception):
  pass


@dataclasses.dataclass(eq=False)
class Job:
  """One request: its prompt and parameters, and the events its handler awaits:
  ("delta", text), ("done", Generation) or ("error", message)."""
  prompt: Prompt
  sampling: object           # api.Sampling: what a batch shares
  max_tokens: int
  stream: bool
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
  arrived: float = dataclasses.field(default_factory=time.monotonic)
  cancelled: bool = False

  def push(self, kind: str, value) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Batcher:
  """`pad`: every batch is padded to max_batch rows, so one compiled program per prompt-length
  bucket serves any traffic (no compile when the load changes; padded rows cost compute).
  Otherwise batches pad to the Generator's power-of-two row buckets."""

  def __init__(self, generator: Generator, *, max_batch: int = 32, max_queue: int = 64,
               window: float = 0.01, pad: bool = False):
    if max_batch < 1 or max_queue < 1:
      raise ValueError("max_batch and max_queue must be at least 1")
    self.gen, self.max_batch, self.max_queue, self.window = generator, max_batch, max_queue, window
    self.pad = pad
    self._waiting: collections.deque = collections.deque()
    self._cond = threading.Condition()
    self._closed = False
    self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "running": 0,
                  "cancelled": 0, "rejected": 0}
    self._thread = threading.Thread(target=self._run, name="serve-batcher", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> None:
    with self._cond:
      if len(self._waiting) >= self.max_queue:
        self.stats["rejected"] += 1
        raise QueueFull(f"server busy: {len(self._waiting)} requests are already waiting "
                        f"(queue bound {self.max_queue}); retry later")
      self._waiting.append(job)
      self.stats["requests"] += 1
      self._cond.notify()

  def waiting(self) -> int:
    with self._cond:
      return len(self._waiting)

  def close(self, timeout: Optional[float] = 5.0) -> None:
    with self._cond:
      self._closed = True
      for job in self._waiting:
        job.push("error", "the server is shutting down")
      self._waiting.clear()
      self._cond.notify_all()
    self._thread.join(timeout)

  # --- the worker ------------------------------------------------------------------------------

  def _take(self) -> Optional[list]:
    """The next batch (oldest request first), or None once closed."""
    with self._cond:
      while True:
        for job in [j for j in self._waiting if j.cancelled]:   # clients that left while waiting
          self._waiting.remove(job)
          self.stats["cancelled"] += 1
        if self._closed:
          return None
        if self._waiting:
          first = self._waiting[0]
          mates = [j for j in self._waiting if j.sampling == first.sampling][:self.max_batch]
          wait = first.arrived + self.window - time.monotonic()
          if len(mates) >= self.max_batch or wait <= 0:
            for job in mates:
              self._waiting.remove(job)
            return mates
          self._cond.wait(wait)
        else:
          self._cond.wait()

  def _run(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        return
      self.stats["running"] = len(batch)
      try:
        self._generate(batch)
      finally:
        self.stats["running"] = 0

  def _generate(self, batch: list) -> None:
    s = batch[0].sampling
    gc = GenerationConfig(max_new_tokens=max(j.max_tokens for j in batch),
                          temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                          stop_strings=s.stop, stop_token_ids=[] if s.ignore_eos else None)
    streaming = any(j.stream for j in batch)
    try:
      results = self.gen.generate(
          [j.prompt for j in batch], gc, limits=[j.max_tokens for j in batch],
          batch_size=self.max_batch if self.pad else None,
          stream=(lambda row, delta: batch[row].push("delta", delta)) if streaming else None,
          cancel=(lambda row: batch[row].cancelled) if streaming else None)
    except Exception as e:  # noqa: BLE001 - reported to every client of the batch
      log.exception("generation failed for a batch of %d", len(batch))
      for job in batch:
        job.push("error", f"generation failed: {type(e).__name__}: {e}"[:300])
      return
    self.stats["batches"] += 1
    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
    self.stats["cancelled"] += sum(r.finish_reason == "cancelled" for r in results)
    for job, res in zip(batch, results):
      job.push("done", res)
