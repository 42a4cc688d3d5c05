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

Opening the directory verifies its steps, newest first: one whose files cannot be read (a data file
deleted or cut short by a full disk or a crash) is moved aside to `<step>.unreadable`, said in one
line, and the run resumes from the newest readable step (later saves can then reuse the number).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal

import grain.python as gp
import jax
import numpy as np
import orbax.checkpoint as ocp

from data.errors import UserError
from vlm.damage import read_error, unreadable

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
    if jax.process_index() == 0:
      set_aside_unreadable(self.directory)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("medvlm_checkpoints_verified")
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
    try:
      out = self.mgr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:   # noqa: BLE001 - damage the opening check cannot see (corrupt)
      bad = read_error(e)
      if bad is None:
        raise
      raise UserError(unreadable_message(self.directory, step, bad) +
                      f"; move it aside (mv {self.directory}/{step} {self.directory}/{step}"
                      ".unreadable) and rerun to resume from the step before") from e
    return out["state"], step

  def restore_data(self, step: int, iterator):
    """Only the iterator's state of checkpoint `step` (the loop reads its first batch before the
    weights, so bad data fails before they are loaded)."""
    self.mgr.restore(step, args=ocp.args.Composite(
        data=gp.PyGrainCheckpointRestore(_IteratorState(target=iterator))))

  def close(self):
    self.mgr.wait_until_finished()
    self.mgr.close()


def step_problem(step_dir: str):
  """What makes the saved step `step_dir` unreadable, or None."""
  problem = unreadable(os.path.join(step_dir, "state"))
  if problem:
    return problem
  for name in sorted(glob.glob(os.path.join(step_dir, "data", "*.json"))):
    try:
      with open(name, encoding="utf-8") as f:
        json.load(f)
    except ValueError as e:
      return f"{name} is malformed ({e})"
  return None


def unreadable_message(directory: str, step: int, problem: str) -> str:
  return f"checkpoint of step {step} in {directory} cannot be read: {problem}"


def set_aside_unreadable(directory: str):
  """Move the newest steps that cannot be read aside (`<step>.unreadable`), each said in one line
  with the step the run falls back to."""
  if not os.path.isdir(directory):
    return
  steps = sorted((int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d))), reverse=True)
  for i, step in enumerate(steps):
    problem = step_problem(os.path.join(directory, str(step)))
    if problem is None:
      return
    aside, n = os.path.join(directory, f"{step}.unreadable"), 1
    while os.path.exists(aside):
      n += 1
      aside = os.path.join(directory, f"{step}.unreadable{n}")
    os.rename(os.path.join(directory, str(step)), aside)
    fallback = (f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else
                "no older checkpoint: starting from step 0")
    log.warning("%s; moved to %s, %s", unreadable_message(directory, step, problem), aside,
                fallback)


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
