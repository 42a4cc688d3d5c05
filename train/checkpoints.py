"""Run checkpoints (orbax CheckpointManager) and preemption.

WORKDIR/checkpoints/<step>/ holds `state` (trainable float32 masters, optimizer state, step, RNG,
non-finite counters; sharded, each process writes its shards) and `data` (every process's grain
iterator state, grain's own orbax handler). Frozen weights are not saved: they are re-read from
model.init on resume, which keeps stage-1 and LoRA checkpoints small. Saves are asynchronous, every
`every` steps and at the end, keeping the newest `keep`.

SIGTERM / SIGINT set a flag; the loop saves the step it has reached and exits (a second SIGINT
interrupts at once). A signal that arrives while the loop waits for data stops the wait itself
(Preempted), so a slow or stuck iterator cannot hold a stop back. With several processes the flag
is agreed on every `sync_every` steps, so all of them stop at the same step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal

import grain.python as gp
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class _IteratorState:
  """What grain's orbax handler asks of an iterator: a JSON state as bytes (saved: the state
  recorded when the step's batch was taken, not the prefetching iterator's current one)."""

  def __init__(self, state=None, target=None):
    self.state, self.target = state, target

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, raw: bytes):
    self.state = json.loads(raw)
    if self.target is not None:
      self.target.set_state(self.state)

  def start_prefetch(self):
    pass


class Checkpoints:

  def __init__(self, directory: str, *, every: int, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = max(int(every), 1)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                        enable_async_checkpointing=use_async)
    self.mgr = ocp.CheckpointManager(
        self.directory, options=opts,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": gp.PyGrainCheckpointHandler()})

  def latest_step(self):
    return self.mgr.latest_step()

  def save(self, step: int, state, data_state, *, force: bool = False) -> bool:
    """Save every `every` steps, or now with force=True."""
    if not force and step % self.every:
      return False
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = gp.PyGrainCheckpointSave(_IteratorState(data_state))
    saved = self.mgr.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      log.info("checkpoint of step %d started in %s", step, self.directory)
    return saved

  def restore(self, abstract_state, iterator=None, step=None):
    """(state, step) of the newest (or given) checkpoint; the iterator's state is set in place."""
    step = self.latest_step() if step is None else step
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      args["data"] = gp.PyGrainCheckpointRestore(_IteratorState(target=iterator))
    out = self.mgr.restore(step, args=ocp.args.Composite(**args))
    return out["state"], step

  def restore_data(self, step: int, iterator):
    """Only the iterator's state of checkpoint `step` (the loop reads its first batch before the
    weights, so bad data fails before they are loaded)."""
    self.mgr.restore(step, args=ocp.args.Composite(
        data=gp.PyGrainCheckpointRestore(_IteratorState(target=iterator))))

  def close(self):
    self.mgr.wait_until_finished()
    self.mgr.close()


class Preempted(BaseException):
  """A stop signal arrived while the loop waited for data (a BaseException, like
  KeyboardInterrupt, so that no `except Exception` in the data path swallows it)."""


class Preemption:
  """SIGTERM / SIGINT -> save and stop at the next step boundary, or at once while waiting for
  data (single process; several processes must stop at the same step, see should_stop)."""

  def __init__(self, sync_every: int = 10):
    self.requested, self.sync_every = False, max(int(sync_every), 1)
    self._waiting = False
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread (e.g. a notebook worker): no handler
        pass

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    if self._waiting:
      self._waiting = False
      log.warning("%s received while waiting for data: stopping", signal.Signals(signum).name)
      raise Preempted(signum)
    log.warning("%s received: saving a checkpoint at the next step boundary",
                signal.Signals(signum).name)

  @contextlib.contextmanager
  def waiting(self):
    """Around a wait for data: a stop signal now (or one already received) raises Preempted."""
    if jax.process_count() > 1:
      yield
      return
    if self.requested:
      raise Preempted()
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))

  def close(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
