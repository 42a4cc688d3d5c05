"""One training stage: plan the state, load or resume it, run the jitted steps over the grain
iterator with periodic held-out loss and checkpoints, and write WORKDIR/final (a checkpoint dir
that vlm.from_pretrained and `python -m convert export` read).

The loop keeps one step in flight: it dispatches step s, takes batch s + 1 from the iterator while
the device works, then reads step s's metrics. The iterator state saved with a checkpoint is the
one recorded right after the last consumed batch, so a resume sees exactly the batches a straight
run would have.

final/ means the planned steps ran: it is written with a completion record (train/record.py) that
the next run checks before it skips the stage; a run the data cannot carry to its planned steps
writes none and fails (IncompleteRun; train.allow_incomplete accepts it). Every run ends with a
summary line: steps, samples used and skipped per reason, tokens, time, where the model is. Its
counts and time are the stage's, over every resume (they are saved with each checkpoint,
train/batches.py), so a resumed run's record is an uninterrupted one's but for the time.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import jax
import numpy as np

from data.errors import UserError
from data.pipeline import make_iterator, open_sources, skip_summary
from train import plan as plan_lib
from train import preflight, record, source
from train import state as state_lib
from train.batches import Batches, HeldOut, data_config, fetch, total_steps
from train.checkpoints import Checkpoints, Preempted, Preemption
from train.metrics import Flops, Logger, fmt_time, peak_flops
from train.step import make_train_step
from train.trainable import combine
from vlm import checkpoint
from vlm.sharding import batch_shardings

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """train.max_nonfinite steps in a row had non-finite loss or gradients."""


class IncompleteRun(UserError):
  """The data ran out before the planned steps and the config does not accept a short run."""


class NoCheckpoints:
  """Checkpoints that write nothing (run(save=False))."""
  directory = None

  def latest_step(self):
    return None

  def save(self, *args, **kwargs) -> bool:
    return False

  def close(self):
    pass


class Summary:
  """The line every run ends with: steps, samples used and skipped per reason, tokens, time, and
  where the model is; the counts are those of the stage's batches up to the last step taken
  (train/batches.py TOTALS: a resumed run's include the runs before it), the time that of this
  run and those before it (`clock`: Batches.seconds)."""

  def __init__(self, name: str, planned: int, start: int, clock):
    self.name, self.planned, self.start, self.step, self.clock = name, planned, start, start, clock
    self.samples = self.tokens = self.trained = 0
    self.skipped: dict = {}

  def count(self, totals: dict):
    """The totals up to the last step taken (a batch's state, Batches.get_state()['totals'])."""
    self.samples, self.tokens, self.trained = (totals["samples"], totals["tokens"],
                                               totals["trained_tokens"])

  def line(self, outcome: str, where: str) -> str:
    resumed = f" (resumed at {self.start})" if self.start else ""
    skipped = sum(self.skipped.values())
    per = f" ({skip_summary(self.skipped)})" if skipped else ""
    return (f"{self.name}: {outcome} at step {self.step} of {self.planned}{resumed}; "
            f"{self.samples:,} samples used, {skipped:,} skipped{per}, {self.tokens:,} tokens "
            f"({self.trained:,} trained), {fmt_time(self.clock())}; {where}")


class InFlight:
  """The steps dispatched whose metrics are not logged yet. Reading a step's metrics waits for the
  device, so the loop leaves the newest one queued while it takes the next batch; logging a step
  M non-finite steps in a row raises NonFiniteError(that step)."""

  def __init__(self, logger: Logger, max_nonfinite: int):
    self.logger, self.max_nonfinite = logger, max_nonfinite
    self.queue: list = []
    self.restart_clock()

  def restart_clock(self):
    """The next step's time counts from now (after the setup, after a held-out pass)."""
    self.t_last = time.time()

  def put(self, step: int, m: dict, *, lr: float, flops: float, skipped: dict):
    self.queue.append((step, m, lr, flops, int(sum(skipped.values()))))

  def flush(self, keep: int = 0):
    """Log the metrics of the steps dispatched so far but the last `keep`."""
    while len(self.queue) > keep:
      step, m, lr, flops, skipped = self.queue.pop(0)
      m, now = fetch(m), time.time()
      values = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
                "tokens": int(m["real_tokens"]), "trained_tokens": int(m["tokens"]),
                "step_time": now - self.t_last, "flops": flops, "skipped_samples": skipped,
                "skipped_steps": int(m["skipped_steps"])}
      self.t_last = now
      if not bool(m["finite"]):
        self.logger.message(f"step {step}: non-finite loss or gradients, update skipped "
                            f"({int(m['nonfinite'])} in a row, {int(m['skipped_steps'])} in total)")
      self.logger.step(step, values)
      if int(m["nonfinite"]) >= self.max_nonfinite:
        raise NonFiniteError(step)


class Session:
  """What a run opens (its checkpoints, logger, batch iterator and preemption handler) and the
  summary line it ends with. `end` writes the line and closes whatever is still open; leaving the
  `with` block by an exception no handler ended (bad data, a bug, a second Ctrl-C) ends it as
  stopped, with the newest checkpoint named. Each is closed once: the iterator and the signal
  handlers when the loop is over (close_data), the checkpoints before the final model is written
  (close_checkpoints), the logger after the summary line."""

  def __init__(self, config, workdir: str, plan, dcfg, steps: int, *, save: bool, t0: float):
    with contextlib.ExitStack() as opening:   # a failure while opening closes what was opened
      self.ckpts = (Checkpoints(os.path.join(workdir, "checkpoints"),
                                every=config.checkpoint.every, keep=config.checkpoint.keep,
                                use_async=config.checkpoint.use_async)
                    if save else NoCheckpoints())
      opening.callback(self.ckpts.close)
      self.start = self.ckpts.latest_step() or 0
      self.logger = Logger(workdir, total_steps=steps, start_step=self.start, name=config.name,
                           log_every=config.train.log_every,
                           peak=peak_flops(config.train.peak_tflops),
                           enabled=jax.process_index() == 0)
      opening.callback(self.logger.close)
      self.batches = Batches(make_iterator(dcfg), plan.config.vision is None, plan.mesh, t0)
      self.summary = Summary(config.name, steps, self.start, self.batches.seconds)
      opening.callback(self.batches.it.close)
      self.preempt = Preemption(config.checkpoint.sync_every)
      opening.pop_all()
    self._data = self._ckpts = True
    self.ended = False

  def __enter__(self) -> Session:
    return self

  def close_data(self):
    """The loop is over: the signal handlers are restored and the iterator is closed."""
    if self._data:
      self._data = False
      self.preempt.close()
      self.batches.it.close()

  def close_checkpoints(self, step: int, st, data_state):
    """Save the step reached unless it is saved already or nothing was trained; wait for the
    saves to finish."""
    if self._ckpts:
      if step > self.start and self.ckpts.latest_step() != step:
        self.ckpts.save(step, st, data_state, force=True)
      self._ckpts = False
      self.ckpts.close()

  def end(self, outcome: str, where: str):
    """The summary line (at summary.step), after everything else is closed."""
    self.close_data()
    if self._ckpts:
      self._ckpts = False
      self.ckpts.close()
    self.ended = True
    self.logger.message(self.summary.line(outcome, where))
    self.logger.close()

  def __exit__(self, kind, exc, tb):
    if not self.ended:   # bad data, a bug, a second Ctrl-C: say where the run stopped
      self.summary.skipped = self.summary.skipped or self.batches.it.skip_counts()
      newest = self.ckpts.latest_step()
      self.end("stopped", "no model written" + (f" (newest checkpoint: step {newest} in "
                                                f"{self.ckpts.directory})" if newest else ""))
    return False


def itstime(step: int, every: int) -> bool:
  """Whether `step` steps done is a multiple of `every` (0: never)."""
  return bool(every) and step % every == 0


def batch_shape(batch: dict) -> tuple:
  """(samples, tokens, image slots) of the global batch, for the FLOP count."""
  b, t = batch["input_ids"].shape
  n = b * jax.process_count()
  return n, t, n * batch["pixel_values"].shape[1] if "pixel_values" in batch else 0


def run(config, workdir: str, *, init=None, save: bool = True) -> dict:
  """Train one stage in `workdir`; returns {"final": path, "step": int, "preempted": bool}.

  A stage whose final model and completion record (train/record.py) match this config and data
  is skipped. A run ends with WORKDIR/final only when it trained the planned steps (train.steps;
  with train.epochs: until every epoch was read); a shorter one raises IncompleteRun unless
  train.allow_incomplete. Bad data fails (data.pipeline.SkipGuardError) before the weights are
  read: the first batch is taken first.

  For benchmarks (bench/train_e2e.py): `init(plan) -> (state, frozen)` stands in for reading
  model.init (random weights made on the device), and save=False writes no checkpoint and no final
  model and also returns the live "state", "frozen", "step_fn" (the jitted step as compiled for
  this run's batches) and "batch" (the last host batch)."""
  preflight.check(config, paths=False)
  t0, workdir = time.time(), os.path.abspath(workdir)
  final = os.path.join(workdir, "final")
  done = record.finished(config, workdir) if save else None
  if done is not None:
    log.info("%s exists: stage already complete (%d of %d steps)", final, done["steps_done"],
             done["steps_planned"])
    return {"final": final, "step": None, "preempted": False}
  if init is None:
    source.check_init(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "train_config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = plan_lib.mesh_for(config)
  dcfg = data_config(config, plan_lib.train_config(config, source.source_config(config)))
  steps = total_steps(config, dcfg)
  plan = plan_lib.plan(config, mesh, steps)
  accum = int(config.optim.grad_accum)

  with Session(config, workdir, plan, dcfg, steps, save=save, t0=t0) as s:
    start = step = s.start
    st = frozen = step_fn = batch = data_state = held_out = None
    metrics = InFlight(s.logger, config.train.max_nonfinite)
    preempted = False
    try:
      try:
        if start:
          s.ckpts.restore_data(start, s.batches)
          s.summary.count(s.batches.totals)
        with s.preempt.waiting():
          got = s.batches.next()   # bad data fails here, before any weight is read
        st, frozen = _load(config, plan, init, s.ckpts, start)
        flops = Flops(plan.config, plan.abstract, plan.mask)
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(st["trainable"]))
        n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(frozen))
        s.logger.message(f"{config.name}: {steps} steps of {dcfg.global_batch} ({accum} "
                         f"micro-batches), {n_train:,} trainable / {n_frozen:,} frozen "
                         f"parameters, mesh {dict(mesh.shape)}, from "
                         f"{source.resolve_init(config.model.init)}")
        if config.eval.paths:
          eval_cfg = data_config(config, plan.config, eval_=True)
          open_sources(eval_cfg)   # a missing held-out file fails now, not at the first evaluation
          held_out = HeldOut(config, plan, eval_cfg, mesh)
        # The schedule's values, read on the host: evaluated per step on the accelerator, they
        # would queue behind the step in flight and wait for it, leaving the device idle while the
        # host dispatches the next one.
        lrs = np.asarray(jax.jit(jax.vmap(plan.schedule))(np.arange(max(steps, 1))))
        metrics.restart_clock()
        while got is not None and step < steps:
          batch, placed, state_after, _ = got
          if step_fn is None:
            step_fn = make_train_step(plan.model, plan.tx, mesh=mesh,
                                      state_shardings=plan.state_shardings,
                                      frozen_shardings=plan.frozen_shardings,
                                      batch_shardings=batch_shardings(mesh, batch),
                                      grad_accum=accum, loss_chunk=config.model.loss_chunk,
                                      rules=plan.rules)
          st, m = step_fn(st, frozen, placed)
          step, data_state = step + 1, state_after
          s.summary.step = step
          s.summary.count(state_after["totals"])
          metrics.put(step, m, lr=float(lrs[step - 1]), flops=flops.step(*batch_shape(batch)),
                      skipped=s.batches.skipped)
          got = None
          if step < steps:
            with s.preempt.waiting():
              got = s.batches.next()   # overlaps the device step
          metrics.flush(keep=1)
          if s.preempt.should_stop(step):
            raise Preempted()
          s.ckpts.save(step, st, data_state)
          if held_out is not None and itstime(step, config.eval.every):
            metrics.flush()
            s.logger.eval(step, *held_out(st["trainable"], frozen))
            metrics.restart_clock()
      except Preempted:   # a stop signal, at a step boundary or while waiting for data
        preempted = True
      metrics.flush()
    except NonFiniteError as e:
      s.ckpts.save(step, st, data_state, force=True)
      s.end("stopped", f"parameters of the last finite step saved as step {step}")
      raise NonFiniteError(
          f"{config.train.max_nonfinite} steps in a row (up to step {int(e.args[0])}) had "
          f"non-finite loss or gradients; parameters are those of the last finite step, saved as "
          f"step {step} in {s.ckpts.directory} (a resume continues after these batches). Check "
          f"the data of those steps, lower optim.lr or raise optim.clip_norm / "
          f"train.max_nonfinite.") from None
    s.summary.skipped = dict(s.batches.skipped)
    s.close_data()
    s.close_checkpoints(step, st, data_state)

    if preempted:
      if s.ckpts.latest_step() == step:
        s.logger.message(f"preempted: checkpoint of step {step} saved in {s.ckpts.directory}")
        s.end("preempted", f"checkpoint of step {step} in {s.ckpts.directory}; rerun to resume")
      else:
        s.end("preempted", "nothing trained yet")
      return {"final": None, "step": step, "preempted": True}
    complete = step >= steps or (not config.train.steps and step > 0)   # epochs: every one read
    if not complete and not config.train.get("allow_incomplete", False):
      kept = (f"the checkpoint of step {step} is in {s.ckpts.directory}" if step else
              "nothing was trained")
      s.end("incomplete", "no model written")
      raise IncompleteRun(f"the data ran out after {step} of {steps} planned steps: no final "
                          f"model written ({kept}); check data.paths / data.num_epochs, or set "
                          f"train.allow_incomplete=True and rerun to accept the shorter run")
    if held_out is not None and not itstime(step, config.eval.every):
      s.logger.eval(step, *held_out(st["trainable"], frozen))
    if not save:
      s.end("done", "not saved (save=False)")
      return {"final": None, "step": step, "preempted": False, "state": st, "frozen": frozen,
              "step_fn": step_fn, "batch": batch}
    checkpoint.save(final, state_lib.export_config(plan, dcfg), combine(frozen, st["trainable"]),
                    dcfg.tokenizer_dir)
    if jax.process_index() == 0:
      record.write(workdir, record.make(
          config, steps_planned=steps, steps_done=step, complete=complete, final=final,
          samples=s.summary.samples, skipped=s.summary.skipped, tokens=s.summary.tokens,
          trained_tokens=s.summary.trained, seconds=round(s.batches.seconds(), 1),
          last=s.logger.last))
    s.end("done" if complete else "incomplete (train.allow_incomplete)", f"model in {final}")
    return {"final": final, "step": step, "preempted": False}


def _load(config, plan, init, ckpts, start: int) -> tuple:
  """(state, frozen): model.init's weights (or init(plan)'s), the trainable state replaced by
  checkpoint `start`'s on a resume."""
  st, frozen = (init or functools.partial(state_lib.load, config))(plan)
  if start:
    abstract, _ = plan_lib.abstract_state(plan)
    del st   # free the fresh trainable / optimizer state before reading the saved one
    st, _ = ckpts.restore(abstract, step=start)
    log.info("resumed from step %d", start)
  return st, frozen
