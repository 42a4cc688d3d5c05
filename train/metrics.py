"""Training metrics: a rich progress bar (plain log lines when not on a terminal), metrics.jsonl and
TensorBoard event files (tensorboard's own writer, no TensorFlow) in the workdir, and the model
FLOPs behind the MFU figure.

A resumed run first rewinds both to the restored step: rows and events of the steps after it
(logged by the run that was killed before their checkpoint) are dropped, so every step is there
once, with the values of the run that the checkpoints continue.

FLOPs are model FLOPs of what the step computes, no remat recompute: per LLM position 2N forward,
2N backward through activations when anything upstream trains (connector, vision), 2N_t for the
weight gradients of the N_t trainable weights, and attention's 4*L*H*Dh*T forward (x3 in training);
the vision tower and connector count per image slot (x1 forward, more when they train).
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from typing import Optional

import jax
from flax.traverse_util import flatten_dict

# Dense bf16 peak per chip (vendor datasheets); MFU is left out on devices not listed here.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A40": 149.7, "L4": 121.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def peak_flops(override: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of all devices together (None when unknown, e.g. CPU)."""
  if override:
    return override * 1e12 * jax.device_count()
  kind = jax.devices()[0].device_kind
  for name, tf in sorted(PEAK_TFLOPS.items(), key=lambda x: -len(x[0])):
    if name.lower() in kind.lower():
      return tf * 1e12 * jax.device_count()
  return None


def _count(params, mask, prefix, trained_only=False, skip=()):
  n = 0
  for k, v in flatten_dict(params).items():
    path = "/".join(k)
    if path.startswith(prefix) and not any(s in path for s in skip) and len(v.shape) >= 2:
      if not trained_only or flatten_dict(mask)[k]:
        n += math.prod(v.shape)
  return n


class Flops:
  """Model FLOPs of one training step from the network's shapes and its trainable mask."""

  def __init__(self, cfg, abstract, mask):
    skip = ("/embed",)   # the token lookup is a gather, not a matmul
    self.llm = _count(abstract, mask, "llm/", skip=skip)
    self.llm_t = _count(abstract, mask, "llm/", True, skip=skip)
    c = cfg.llm
    self.attn = 4 * c.layers * c.heads * c.head_dim   # x T, per position, forward
    self.vision = self.vision_t = self.conn = self.conn_t = self.tile_tokens = self.tiles = 0
    self.vision_layers = 1.0
    if cfg.vision is not None:
      v = cfg.vision
      self.vision = _count(abstract, mask, "vision/")
      self.vision_t = _count(abstract, mask, "vision/", True)
      self.vision_layers = v.layers_used / v.layers
      self.conn = _count(abstract, mask, "connector/")
      self.conn_t = _count(abstract, mask, "connector/", True)
      self.tile_tokens = v.grid ** 2 + 1
      t = cfg.tiler
      self.tiles = (sum((s // v.image_size) ** 2 for s in t.scales) if t.kind == "s2" else
                    t.max_tiles(v) if t.kind == "anyres" else 1)
      self.features = v.grid ** 2 * (t.max_tiles(v) if t.kind == "anyres" else 1)
    self.upstream_trains = bool(self.vision_t or self.conn_t)

  def step(self, batch: int, seq: int, images: int) -> float:
    llm_fwd = 2 * self.llm + self.attn * seq
    llm = llm_fwd + 2 * self.llm_t + (2 * self.llm + 2 * self.attn * seq
                                       if self.upstream_trains or self.llm_t else 0)
    flops = batch * seq * llm
    if images and self.tiles:
      vis_fwd = 2 * self.vision * self.vision_layers * self.tile_tokens * self.tiles
      vis = vis_fwd * (3 if self.vision_t else 1)
      conn = 2 * self.conn * self.features * (3 if self.conn_t else 1)
      flops += images * (vis + conn)
    return float(flops)


class _Events:
  """TensorBoard scalars without TensorFlow; the events of steps up to `keep_until` that earlier
  runs wrote are carried into this writer's file, the rest dropped with their files."""

  def __init__(self, logdir: str, keep_until: int = 0):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    old = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    events = (Event.FromString(r) for f in old for r in RawEventFileLoader(f).Load())
    kept = [e for e in events if e.HasField("summary") and e.step <= keep_until]
    self._w = EventFileWriter(logdir)
    for e in kept:
      self._w.add_event(e)
    self._w.flush()
    for f in old:
      os.remove(f)

  def scalars(self, step: int, values: dict):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    vals = [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
            if isinstance(v, (int, float)) and math.isfinite(v)]
    self._w.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=vals)))

  def close(self):
    self._w.close()


def _rewind_jsonl(path: str, step: int):
  """metrics.jsonl without the rows after `step` (and without a line a kill cut short)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Logger:
  """Writes metrics on process 0; the other processes keep quiet."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, name: str = "train",
               log_every: int = 1, peak: Optional[float] = None, enabled: bool = True):
    self.enabled, self.total, self.log_every, self.peak = enabled, total_steps, log_every, peak
    self._ema, self._progress, self._seen = None, None, 0
    self.last: dict = {}
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _rewind_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._events = _Events(os.path.join(workdir, "tensorboard"), keep_until=start_step)
    if sys.stderr.isatty():
      from rich.progress import BarColumn, Progress, TextColumn
      self._progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total} {task.fields[info]}"))
      self._task = self._progress.add_task(name, total=total_steps, completed=start_step, info="")
      self._progress.start()

  def write(self, step: int, values: dict, kind: str = "train"):
    rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    self._events.scalars(step, {f"{kind}/{k}": v for k, v in values.items()})

  def step(self, step: int, values: dict):
    """values: loss, grad_norm, lr, tokens, step_time, flops, skipped (samples), ..."""
    dt = values.get("step_time", 0.0)
    if dt:
      self._seen += 1   # the first step carries the compilation: kept out of the ETA
      if self._seen > 1:
        self._ema = dt if self._ema is None else 0.9 * self._ema + 0.1 * dt
      values["tokens_per_s"] = values.get("tokens", 0) / dt
      if self.peak and values.get("flops"):
        values["mfu"] = values["flops"] / dt / self.peak
    self.last = values
    if not self.enabled:
      return
    self.write(step, values)
    eta = (self.total - step) * (self._ema or 0.0)
    info = (f"loss {values['loss']:.4f} lr {values['lr']:.2e} gnorm {values['grad_norm']:.3f} "
            f"tok/s {values.get('tokens_per_s', 0):,.0f} step {dt:.3f}s"
            + (f" MFU {values['mfu']:.1%}" if "mfu" in values else "")
            + f" ETA {fmt_time(eta)} skipped {values.get('skipped_samples', 0)}"
            + (f" nonfinite {values['skipped_steps']}" if values.get("skipped_steps") else ""))
    if self._progress is not None:
      self._progress.update(self._task, completed=step, info=info)
    elif step % self.log_every == 0 or step == self.total:
      print(f"step {step}/{self.total} {info}", flush=True)

  def eval(self, step: int, loss: float, tokens: int):
    if not self.enabled:
      return
    self.write(step, {"loss": loss, "tokens": tokens}, kind="eval")
    self.message(f"step {step}: held-out loss {loss:.4f} over {tokens} tokens")

  def message(self, msg: str):
    if not self.enabled:
      return
    if self._progress is not None:
      self._progress.console.print(msg)
    else:
      print(msg, flush=True)

  def close(self):
    if not self.enabled:
      return
    if self._progress is not None:
      self._progress.stop()
    self._jsonl.close()
    self._events.close()
