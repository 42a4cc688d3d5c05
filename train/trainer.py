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
summary line: steps, samples used and skipped per reason, tokens, time, where the model is.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Optional

import jax
import numpy as np

from data.conversation import IGNORE
from data.errors import UserError
from data.pipeline import DataConfig, make_iterator, open_sources, skip_summary, to_global
from train import record
from train import state as state_lib
from train.checkpoints import Checkpoints, Preempted, Preemption
from train.metrics import Flops, Logger, fmt_time, peak_flops
from train.step import make_eval_step, make_train_step
from vlm import checkpoint, lora
from vlm.sharding import batch_shardings

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  pass


def data_config(config, model_cfg, *, eval_: bool = False) -> DataConfig:
  kw = {k: v for k, v in config.data.to_dict().items() if v is not None}
  kw["tokenizer_dir"] = state_lib.tokenizer_dir(config)
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


class NoCheckpoints:
  """Checkpoints that write nothing (run(save=False))."""
  directory = None

  def latest_step(self):
    return None

  def save(self, *args, **kwargs) -> bool:
    return False

  def close(self):
    pass


class IncompleteRun(UserError):
  """The data ran out before the planned steps and the config does not accept a short run."""


class Summary:
  """The line every run ends with: steps, samples used and skipped per reason, tokens, time, and
  where the model is."""

  def __init__(self, name: str, planned: int, start: int, t0: float):
    self.name, self.planned, self.start, self.step, self.t0 = name, planned, start, start, t0
    self.samples = self.tokens = self.trained = 0
    self.skipped: dict = {}

  def line(self, outcome: str, where: str) -> str:
    resumed = f" (resumed at {self.start})" if self.start else ""
    skipped = sum(self.skipped.values())
    per = f" ({skip_summary(self.skipped)})" if skipped else ""
    return (f"{self.name}: {outcome} at step {self.step} of {self.planned}{resumed}; "
            f"{self.samples:,} samples used, {skipped:,} skipped{per}, {self.tokens:,} tokens "
            f"({self.trained:,} trained), {fmt_time(time.time() - self.t0)}; {where}")


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
  t0, workdir = time.time(), os.path.abspath(workdir)
  final = os.path.join(workdir, "final")
  done = record.finished(config, workdir) if save else None
  if done is not None:
    log.info("%s exists: stage already complete (%d of %d steps)", final, done["steps_done"],
             done["steps_planned"])
    return {"final": final, "step": None, "preempted": False}
  if init is None:
    state_lib.check_init(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "train_config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = state_lib.mesh_for(config)
  src = state_lib.source_config(config)
  dcfg = data_config(config, state_lib.train_config(config, src))
  steps = total_steps(config, dcfg)
  plan = state_lib.plan(config, mesh, steps)
  accum = int(config.optim.grad_accum)
  if dcfg.global_batch % accum:
    raise UserError(f"data.global_batch {dcfg.global_batch} is not divisible by optim.grad_accum "
                    f"{accum}")

  ckpts = (Checkpoints(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                       keep=config.checkpoint.keep, use_async=config.checkpoint.use_async)
           if save else NoCheckpoints())
  start = ckpts.latest_step() or 0
  logger = Logger(workdir, total_steps=steps, start_step=start, name=config.name,
                  log_every=config.train.log_every, peak=peak_flops(config.train.peak_tflops),
                  enabled=jax.process_index() == 0)
  summary = Summary(config.name, steps, start, t0)
  batches = Batches(make_iterator(dcfg), plan.config.vision is None, mesh)
  preempt = Preemption(config.checkpoint.sync_every)
  step, st, frozen, step_fn, batch, held_out, queued = start, None, None, None, None, None, []
  data_state, t_last = None, time.time()

  def finish_metrics(m, at: int, data_skips: dict, shape, t_prev):
    m = fetch(m)
    now = time.time()
    values = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
              "lr": float(lrs[at - 1]), "tokens": int(m["real_tokens"]),
              "trained_tokens": int(m["tokens"]), "step_time": now - t_prev,
              "flops": flops.step(*shape), "skipped_samples": int(sum(data_skips.values())),
              "skipped_steps": int(m["skipped_steps"])}
    summary.tokens += values["tokens"]
    summary.trained += values["trained_tokens"]
    if not bool(m["finite"]):
      logger.message(f"step {at}: non-finite loss or gradients, update skipped "
                     f"({int(m['nonfinite'])} in a row, {int(m['skipped_steps'])} in total)")
    logger.step(at, values)
    return now, int(m["nonfinite"])

  def flush(keep: int = 0):
    """Log the metrics of the steps dispatched so far but the last `keep`."""
    nonlocal t_last
    while len(queued) > keep:
      entry = queued.pop(0)
      t_last, bad = finish_metrics(*entry, t_last)
      if bad >= config.train.max_nonfinite:
        raise NonFiniteError(entry[1])

  def end(outcome: str, where: str):
    summary.step = step
    logger.message(summary.line(outcome, where))
    logger.close()

  try:
    if start:
      ckpts.restore_data(start, batches.it)
    with preempt.waiting():
      got = batches.next()   # bad data fails here, before any weight is read
    st, frozen = (init or functools.partial(state_lib.load, config))(plan)
    if start:
      abstract, _ = state_lib.abstract_state(plan)
      del st   # free the fresh trainable / optimizer state before reading the saved one
      st, _ = ckpts.restore(abstract, step=start)
      log.info("resumed from step %d", start)
    flops = Flops(plan.config, plan.abstract, plan.mask)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(st["trainable"]))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(frozen))
    logger.message(f"{config.name}: {steps} steps of {dcfg.global_batch} ({accum} micro-batches), "
                   f"{n_train:,} trainable / {n_frozen:,} frozen parameters, mesh "
                   f"{dict(mesh.shape)}, from {state_lib.resolve_init(config.model.init)}")
    if config.eval.paths:
      eval_cfg = data_config(config, plan.config, eval_=True)
      open_sources(eval_cfg)   # a missing held-out file fails now, not at the first evaluation
      held_out = HeldOut(config, plan, eval_cfg, mesh)
    # The schedule's values, read on the host: evaluated per step on the accelerator, they would
    # queue behind the step in flight and wait for it, leaving the device idle while the host
    # dispatches the next one.
    lrs = np.asarray(jax.jit(jax.vmap(plan.schedule))(np.arange(max(steps, 1))))
    t_last = time.time()
    while got is not None and step < steps:
      batch, placed, state_after, n = got
      b, t = batch["input_ids"].shape
      shape = (b * jax.process_count(), t,
               b * jax.process_count() * batch["pixel_values"].shape[1]
               if "pixel_values" in batch else 0)
      if step_fn is None:
        step_fn = make_train_step(plan.model, plan.tx, mesh=mesh,
                                  state_shardings=plan.state_shardings,
                                  frozen_shardings=plan.frozen_shardings,
                                  batch_shardings=batch_shardings(mesh, batch),
                                  grad_accum=accum, loss_chunk=config.model.loss_chunk,
                                  rules=plan.rules)
      st, m = step_fn(st, frozen, placed)
      step += 1
      data_state = state_after
      summary.samples += n
      queued.append((m, step, dict(batches.skipped), shape))
      got = None
      if step < steps:
        with preempt.waiting():
          got = batches.next()   # overlaps the device step
      flush(keep=1)
      if preempt.should_stop(step):
        raise Preempted()
      ckpts.save(step, st, data_state)
      if held_out is not None and config.eval.every and step % config.eval.every == 0:
        flush()
        logger.eval(step, *held_out(st["trainable"], frozen))
        t_last = time.time()
    flush()
    summary.skipped = dict(batches.skipped)
  except Preempted:
    flush()
    summary.skipped = dict(batches.skipped)
    if step > start and ckpts.latest_step() != step:
      ckpts.save(step, st, data_state, force=True)
    ckpts.close()
    if ckpts.latest_step() == step:
      logger.message(f"preempted: checkpoint of step {step} saved in {ckpts.directory}")
      end("preempted", f"checkpoint of step {step} in {ckpts.directory}; rerun to resume")
    else:
      end("preempted", "nothing trained yet")
    return {"final": None, "step": step, "preempted": True}
  except NonFiniteError as e:
    ckpts.save(step, st, data_state, force=True)
    ckpts.close()
    end("stopped", f"parameters of the last finite step saved as step {step}")
    raise NonFiniteError(
        f"{config.train.max_nonfinite} steps in a row (up to step {int(e.args[0])}) had "
        f"non-finite loss or gradients; parameters are those of the last finite step, saved as "
        f"step {step} in {ckpts.directory} (a resume continues after these batches). Check the "
        f"data of those steps, lower optim.lr or raise optim.clip_norm / train.max_nonfinite."
    ) from None
  except BaseException:   # bad data, a bug, a second Ctrl-C: say where the run stopped
    summary.skipped = summary.skipped or batches.it.skip_counts()
    newest = ckpts.latest_step()
    ckpts.close()
    end("stopped", "no model written" + (f" (newest checkpoint: step {newest} in "
                                         f"{ckpts.directory})" if newest else ""))
    raise
  finally:
    preempt.close()
    batches.it.close()

  complete = step >= steps or (not config.train.steps and step > 0)   # epochs: every one read
  if step > start and ckpts.latest_step() != step:
    ckpts.save(step, st, data_state, force=True)
  ckpts.close()
  if not complete and not config.train.get("allow_incomplete", False):
    kept = (f"the checkpoint of step {step} is in {ckpts.directory}" if step else
            "nothing was trained")
    end("incomplete", "no model written")
    raise IncompleteRun(f"the data ran out after {step} of {steps} planned steps: no final model "
                        f"written ({kept}); check data.paths / data.num_epochs, or set "
                        f"train.allow_incomplete=True and rerun to accept the shorter run")
  if held_out is not None and not (config.eval.every and step % config.eval.every == 0):
    logger.eval(step, *held_out(st["trainable"], frozen))
  if not save:
    end("done", "not saved (save=False)")
    return {"final": None, "step": step, "preempted": False, "state": st, "frozen": frozen,
            "step_fn": step_fn, "batch": batch}
  params = lora.combine(frozen, st["trainable"])
  checkpoint.save(final, state_lib.export_config(plan, dcfg), params, dcfg.tokenizer_dir)
  if jax.process_index() == 0:
    record.write(workdir, record.make(
        config, steps_planned=steps, steps_done=step, complete=complete, final=final,
        samples=summary.samples, skipped=summary.skipped, tokens=summary.tokens,
        seconds=round(time.time() - summary.t0, 1), last=logger.last))
  end("done" if complete else "incomplete (train.allow_incomplete)", f"model in {final}")
  return {"final": final, "step": step, "preempted": False}
