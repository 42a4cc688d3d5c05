"""End-to-end training speed: the real loop fed by the real grain pipeline vs the same compiled step
on a device-resident batch.

  # one GPU: Llama3-Med LoRA stage 2, micro-batch 8 x 2048, half the decoder (~2-2.5 min)
  python -m bench.train_e2e --layers 16 --group-window 8 --warmup 8 --steps 16
  python -m bench.train_e2e --smoke              # tiny S2 model on CPU: checks the script
  python -m bench.train_e2e --smoke --layers 4 --seq 512 --micro-batch 8 --steps 16 \
      --group-window 1 --workers 2               # CPU, ~1 s steps on 2 cores

What it does, in one process:
1. writes a synthetic on-disk dataset: PMC-figure-like JPEGs of 400-1200 px and LLaVA-format JSON
   conversations (bench/data_pipeline.py's generator), and trains the demo tokenizer
   (train/demo.py) on their text; its ids fit any model vocabulary here;
2. runs train.trainer.run (what `python -m train.main` runs) with the recipe of
   configs/stage2_lora.py (--no-lora: configs/stage2.py) pointed at that data, one device, one
   bucket of --seq positions (one compiled shape), weights made on the device (bench/weights.py:
   no checkpoint files) and nothing written back (run(save=False));
   the grain-fed rate is read from the run's metrics.jsonl (step_time: wall time between the
   loop's reads of consecutive steps' metrics), leaving out the first --warmup steps (compile);
3. steps the state the run ended with, with the run's own compiled step function, on the run's
   last batch put on the device once, --steps times with the state donated as the loop does,
   and one wait at the end: the rate the loop would reach if input cost nothing.
The ratio grain-fed / device-resident is the share of the step rate the input path leaves.

A length-grouping window (data.group_window batches, 32 in the recipes) is read in a background
thread while the previous window's batches train (the first one at once), so time a multiple of
--group-window steps to include refills (the table says when the timed steps do not cover whole
windows). Host cores busy / CPU s per step are this process and its
grain workers: on a CPU "device" the input path and the step share the cores.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import threading
import time

from bench.env import device, versions

SMOKE_ARCH = dict(
    llm=dict(vocab_size=0, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128,
             rope_theta=500000.0, max_positions=4096),
    vision=dict(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_dim=64),
    tiler=dict(kind="s2", scales=(28, 56), resize_mode="pad"), connector=dict(kind="mlp2x_gelu"),
    image_token_id=-1, template="llama3")
SMOKE_FLAGS = dict(micro_batch=2, seq=64, steps=3, warmup=2, dtype="float32", lora_rank=8,
                   samples=16, images=4, group_window=1)


# --- data ----------------------------------------------------------------------------------------

def write_data(root: str, samples: int, images: int, seed: int = 0) -> dict:
  """Images + train.json under root, and a tokenizer trained on their text."""
  from bench.data_pipeline import _write_images, _write_samples
  from train.demo import tokenizer
  os.makedirs(root, exist_ok=True)
  path = _write_samples(root, samples, _write_images(root, images, seed), seed)
  with open(path) as f:
    texts = [t["value"].replace("<image>", "") for r in json.load(f) for t in r["conversations"]]
  tok = tokenizer(os.path.join(root, "tokenizer"), texts + ["user", "assistant", "system"])
  return {"json": path, "root": root, "tokenizer": tok}


# --- the run -------------------------------------------------------------------------------------

def arch(args) -> dict:
  """The network as a configs `model.arch` dict: the preset (or the smoke model), resized."""
  import dataclasses
  from vlm.config import VLMConfig, preset
  cfg = VLMConfig.from_dict(SMOKE_ARCH) if args.smoke else preset(args.preset)
  if args.layers:
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, layers=args.layers))
  if args.vision_layers and cfg.vision is not None:
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=args.vision_layers))
  return cfg.to_dict()


def train_config(args, data: dict):
  """The recipe (configs/stage2_lora.py or configs/stage2.py) on the synthetic data."""
  from configs import stage2, stage2_lora
  c = (stage2_lora if args.lora else stage2).get_config()
  c.name = "bench_train_e2e"
  c.model.update(init="scratch", preset="", arch=arch(args), dtype=args.dtype,
                 frozen_dtype=args.dtype)
  if args.lora and args.lora_rank:
    c.model.lora.rank = args.lora_rank
  c.data.update(paths=(data["json"],), image_root=data["root"], tokenizer_dir=data["tokenizer"],
                template=None, max_len=args.seq, pad_buckets=(args.seq,),
                global_batch=args.micro_batch * args.grad_accum, worker_count=args.workers)
  for flag, key in (("read_threads", "read_threads"), ("group_window", "group_window")):
    if getattr(args, flag) is not None:
      c.data[key] = getattr(args, flag)
  c.optim.grad_accum = args.grad_accum
  c.train.update(steps=args.warmup + args.steps, log_every=args.warmup)
  c.mesh.update(shape=(1, 1, 1), num_devices=1)
  c.eval.paths = ()
  return c


class CpuClock:
  """CPU seconds of this process and its grain workers, sampled in the background, so the
  busy cores of a stretch of wall time can be read afterwards: near the core count means the
  host was the limit (on a CPU device: input and compute contend), well under it means idle
  gaps."""

  def __init__(self, every: float = 0.1):
    from bench.data_pipeline import _tree_cpu
    self.read, self.samples, self._stop = _tree_cpu, [], threading.Event()
    self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
    self._thread.start()

  def _run(self, every):
    while not self._stop.wait(every):
      self.mark()

  def mark(self) -> float:
    """Take a sample now; returns its time."""
    t = time.time()
    self.samples.append((t, self.read()))
    return t

  def busy(self, t0: float, t1: float) -> float:
    """Mean busy cores from the last sample at or before t0 to the first at or after t1."""
    before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
    after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
    (a, ca), (b, cb) = before[-1], after[0]
    return (cb - ca) / (b - a) if b > a else float("nan")

  def stop(self):
    self._stop.set()
    self._thread.join()


def grain_rate(workdir: str, warmup: int) -> dict:
  """Steps/s after the first `warmup` steps, steps counted, the first step's seconds and the
  wall-clock span of the timed steps, from metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
  timed = [r for r in recs if r["step"] > warmup]
  if not timed:
    raise ValueError(f"no step after the {warmup} warm-up steps in {workdir}/metrics.jsonl")
  seconds = sum(r["step_time"] for r in timed)
  return {"rate": len(timed) / seconds, "steps": len(timed), "first": recs[0]["step_time"],
          "span": (timed[-1]["time"] - seconds, timed[-1]["time"])}


def resident_rate(config, result: dict, warmup: int, steps: int, clock: CpuClock) -> dict:
  """Steps/s of the run's step function on its last batch, kept on the device, and whether it
  compiled again."""
  import jax
  from data.pipeline import to_global
  from train.plan import mesh_for
  from vlm.sharding import batch_shardings
  step_fn, st, frozen, host = (result[k] for k in ("step_fn", "state", "frozen", "batch"))
  mesh = mesh_for(config)
  batch = jax.block_until_ready(to_global(host, mesh, batch_shardings(mesh, host)))
  cache = getattr(step_fn, "_cache_size", lambda: None)
  before = cache()
  for _ in range(min(warmup, 2)):   # compiled already: only first-run effects to skip
    st, m = step_fn(st, frozen, batch)
  jax.block_until_ready(m)
  t0 = clock.mark()
  for _ in range(steps):
    st, m = step_fn(st, frozen, batch)   # the state is donated, as in the loop
  jax.block_until_ready((st, m))
  t1 = clock.mark()
  return {"rate": steps / (t1 - t0), "span": (t0, t1), "loss": float(m["loss"]),
          "recompiled": None if before is None else cache() != before}


def pipeline_rate(config, steps: int, clock: CpuClock) -> dict:
  """Batches/s of the same input pipeline alone (no step), after its first batch."""
  from data.pipeline import make_iterator
  from train.plan import train_config
  from train.source import source_config
  from train.batches import data_config
  model = train_config(config, source_config(config))
  it = make_iterator(data_config(config, model))
  try:
    next(it)
    t0 = clock.mark()
    for _ in range(steps):
      next(it)
    t1 = clock.mark()
  finally:
    it.close()
  return {"rate": steps / (t1 - t0), "span": (t0, t1)}


def measure(args) -> dict:
  import jax
  from bench.weights import random_train_state
  from train import trainer
  if not args.smoke and jax.default_backend() == "cpu":
    raise SystemExit(f"the {args.preset} shape needs an accelerator (on CPU use --smoke)")
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    data = write_data(os.path.join(root, "data"), args.samples, args.images)
    config = train_config(args, data)
    work = os.path.join(root, "run")
    if os.path.exists(os.path.join(work, "metrics.jsonl")):
      os.remove(os.path.join(work, "metrics.jsonl"))
    load = os.getloadavg()[0]
    clock = CpuClock()
    t = time.perf_counter()
    try:
      with contextlib.redirect_stdout(sys.stderr):   # the loop's log lines; stdout: the report
        result = trainer.run(config, work, init=random_train_state, save=False)
      wall = time.perf_counter() - t
      fed = grain_rate(work, args.warmup)
      resident = resident_rate(config, result, args.warmup, args.steps, clock)
      del result["state"], result["frozen"]
      alone = pipeline_rate(config, args.steps, clock)
    finally:
      clock.stop()
    host = result["batch"]
  return {"grain_steps_per_s": fed["rate"], "resident_steps_per_s": resident["rate"],
          "ratio": fed["rate"] / resident["rate"],
          "samples_per_s": fed["rate"] * host["input_ids"].shape[0],
          "tokens_per_s": fed["rate"] * host["input_ids"].size,
          "pipeline_batches_per_s": alone["rate"],
          "grain_busy_cores": clock.busy(*fed["span"]),
          "resident_busy_cores": clock.busy(*resident["span"]),
          "pipeline_busy_cores": clock.busy(*alone["span"]),
          "steps": fed["steps"], "run_steps": result["step"], "warmup": args.warmup,
          "group_window": int(config.data.group_window), "workers": args.workers,
          "first_step_s": fed["first"], "run_wall_s": wall, "recompiled": resident["recompiled"],
          "loss": resident["loss"],
          "batch_shape": {k: list(v.shape) for k, v in host.items()},
          "device": device(),
          "load_avg_start": load, "load_avg_end": os.getloadavg()[0]}


# --- report --------------------------------------------------------------------------------------

def table(args, r: dict, argv: list) -> str:
  shape = ("smoke S2 model" if args.smoke else args.preset) + (
      f", {args.layers} decoder layers" if args.layers else "")
  recipe = "configs/stage2_lora.py" if args.lora else "configs/stage2.py"
  return "\n".join([
      f"## End-to-end training loop ({'smoke, CPU' if args.smoke else r['device']})", "",
      f"- device: {r['device']}; host: {os.cpu_count()} CPU cores, 1-min load average "
      f"{r['load_avg_start']:.1f} at start, {r['load_avg_end']:.1f} at end",
      f"- versions: {versions('jax', 'jaxlib', 'flax', 'grain')}",
      f"- date: {datetime.date.today().isoformat()}",
      f"- command: `{' '.join(['python -m bench.train_e2e'] + argv)}`",
      f"- run: {recipe} ({shape}, {args.dtype}), micro-batch {args.micro_batch} x "
      f"{args.grad_accum}, sequence {args.seq}, grain workers {args.workers}; batch "
      f"{r['batch_shape']}; {r['steps']} steps timed after {args.warmup} (first step incl. "
      f"compile {r['first_step_s']:.1f} s, whole run {r['run_wall_s']:.1f} s); same compiled step "
      f"on the device-resident batch: recompiled {r['recompiled']}", "",
      "| input | steps/s | step ms | samples/s | tokens/s | host cores busy | host CPU s/step |",
      "|---|---|---|---|---|---|---|",
      f"| grain pipeline (train.trainer.run) | {r['grain_steps_per_s']:.3f} | "
      f"{1e3 / r['grain_steps_per_s']:.0f} | {r['samples_per_s']:.2f} | "
      f"{r['tokens_per_s']:,.0f} | {r['grain_busy_cores']:.2f} | "
      f"{r['grain_busy_cores'] / r['grain_steps_per_s']:.3f} |",
      f"| device-resident batch | {r['resident_steps_per_s']:.3f} | "
      f"{1e3 / r['resident_steps_per_s']:.0f} | "
      f"{r['resident_steps_per_s'] * args.micro_batch * args.grad_accum:.2f} | "
      f"{r['tokens_per_s'] * r['resident_steps_per_s'] / r['grain_steps_per_s']:,.0f} | "
      f"{r['resident_busy_cores']:.2f} | "
      f"{r['resident_busy_cores'] / r['resident_steps_per_s']:.3f} |",
      f"| input pipeline alone, no step (batches) | {r['pipeline_batches_per_s']:.3f} | "
      f"{1e3 / r['pipeline_batches_per_s']:.0f} | "
      f"{r['pipeline_batches_per_s'] * args.micro_batch * args.grad_accum:.2f} | - | "
      f"{r['pipeline_busy_cores']:.2f} | "
      f"{r['pipeline_busy_cores'] / r['pipeline_batches_per_s']:.3f} |", "",
      f"**ratio grain-fed / device-resident: {r['ratio']:.3f}** (target >= 0.9)"]
      + ([] if r["steps"] % r["group_window"] == 0 else [
          "", f"Note: {r['steps']} timed steps are not a multiple of the length-grouping window "
          f"({r['group_window']} batches, read at once): the input cost is not fully counted."]))


def parser():
  p = argparse.ArgumentParser(prog="python -m bench.train_e2e", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llama3_med", help="vlm.config preset (ignored with --smoke)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny S2 model on CPU, float32, a few steps: checks the script")
  p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's)")
  p.add_argument("--vision-layers", type=int, default=0, help="tower layers (0: the model's)")
  p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                 help="stage-2 LoRA recipe (configs/stage2_lora.py); --no-lora: full stage 2")
  p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: the recipe's 128)")
  p.add_argument("--steps", type=int, default=10, help="timed steps, each way")
  p.add_argument("--warmup", type=int, default=3,
                 help="steps left out before timing (the first compiles)")
  p.add_argument("--micro-batch", type=int, default=8, help="rows (= images) per micro-batch")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
  p.add_argument("--seq", type=int, default=2048, help="positions per row (one pad bucket)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype and frozen-weight storage")
  p.add_argument("--workers", type=int, default=0, help="grain worker processes")
  p.add_argument("--read-threads", type=int, default=None,
                 help="decode threads per process (default: the recipe's)")
  p.add_argument("--group-window", type=int, default=None,
                 help="batches per length-grouping window (default: the recipe's)")
  p.add_argument("--samples", type=int, default=256, help="samples in the synthetic data set")
  p.add_argument("--images", type=int, default=48, help="distinct image files")
  p.add_argument("--workdir", default="", help="keep data and run files here (default: temp)")
  p.add_argument("--json", action="store_true", help="print one JSON result instead")
  return p


def parse(argv: list):
  p = parser()
  if "--smoke" in argv:   # tiny defaults; flags given explicitly still win
    p.set_defaults(**SMOKE_FLAGS)
  args = p.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    p.error("--steps and --warmup must be >= 1 (the first step compiles)")
  return args


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse(argv)
  r = measure(args)
  r["command"] = " ".join(["python -m bench.train_e2e"] + argv)
  print(json.dumps(r) if args.json else table(args, r, argv))
  return r


if __name__ == "__main__":
  main()
