"""Data pipeline on the host CPU: how full the batches are, and how fast the S2 image path runs.

packing: LLaVA-Med-like lengths (729 image tokens + uniform 50..700 text tokens, max_len 2048) run
  through the real batchers (data/packing.py) as synthetic token arrays; reports the non-pad token
  fraction of padding to max_len, length-grouped bucket padding, and first-fit packing.
images: the real training pipeline (data/pipeline.py: JSON source, JPEG decode, pad-to-square,
  bicubic resize to 1134x1134 uint8, llama3 template + tokenization, batching) over synthetic
  PMC-figure-like JPEGs; reports steady-state samples/s per worker count (worker start-up and the
  first batch are excluded). The tokenizer is the tiny one the tests build unless --tokenizer.

Prints a markdown section (date, machine, versions, command) for docs/benchmarks.md.

  python -m bench.data_pipeline all
  python -m bench.data_pipeline packing --samples 8192 --batch 16
  python -m bench.data_pipeline images --workers 0,1,2,3 --batches 12
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

IMAGE_TOKENS, MAX_LEN = 729, 2048


# --- packing efficiency --------------------------------------------------------------------------

def _length_dataset(n: int, seed: int):
  import grain.python as gp
  lengths = IMAGE_TOKENS + np.random.default_rng(seed).integers(50, 701, size=n)

  def make(length):
    ids = np.ones(int(length), np.int32)
    return {"input_ids": ids, "labels": ids, "pixel_values": np.zeros((1, 1, 1, 3), np.uint8)}

  return lengths, gp.MapDataset.source(lengths.tolist()).map(make).to_iter_dataset()


def fill(batches) -> dict:
  """Fraction of real (segment id > 0) tokens, samples seen and row lengths used."""
  real = total = samples = 0
  shapes = set()
  for b in batches:
    seg = b["segment_ids"]
    real, total = real + int((seg > 0).sum()), total + seg.size
    samples += sum(len(set(row.tolist()) - {0}) for row in seg)
    shapes.add(seg.shape[1])
  return {"non_pad": real / total, "samples": samples, "shapes": sorted(shapes)}


def bench_packing(n: int, batch: int, seed: int) -> list:
  from data import packing
  quarters = [MAX_LEN // 4 * k for k in (1, 2, 3, 4)]
  cases = [
      ("pad to max_len (one shape)", lambda ds: packing.LengthGroupedBatch(
          ds, batch_size=batch, buckets=[MAX_LEN], window=1, seed=seed)),
      (f"length-grouped, buckets {quarters}, window 32 batches", lambda ds:
       packing.LengthGroupedBatch(ds, batch_size=batch, buckets=quarters, window=32, seed=seed)),
  ]
  for bins in (batch, 4 * batch):
    cases.append((f"packed, first-fit over {bins} rows, <= 2 images/row",
                  lambda ds, bins=bins: packing.packed_batches(
                      ds, batch_size=batch, max_len=MAX_LEN, max_images=2, bins=bins, seed=seed)))
  rows = []
  for name, make in cases:
    lengths, ds = _length_dataset(n, seed)
    t = time.perf_counter()
    stats = fill(iter(make(ds)))
    stats.update(case=name, seconds=time.perf_counter() - t,
                 mean_len=float(lengths.mean()), dropped=n - stats["samples"])
    rows.append(stats)
  return rows


# --- S2 image path throughput --------------------------------------------------------------------

def _write_images(root: str, n: int, seed: int) -> list:
  """PMC-figure-like JPEGs: 400..1200 px per side, smooth gradients plus noise, quality 90."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  names = []
  for i in range(n):
    h, w = (int(x) for x in rng.integers(400, 1201, size=2))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1)
    img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    names.append(f"fig{i}.jpg")
    Image.fromarray(img).save(os.path.join(root, names[-1]), quality=90)
  return names


def _write_samples(root: str, n: int, images: list, seed: int) -> str:
  rng = np.random.default_rng(seed)
  words = "the chest x-ray shows a small nodule in the left lung with no effusion".split()
  recs = []
  for i in range(n):
    answer = " ".join(rng.choice(words, size=int(rng.integers(40, 400))))
    recs.append({"id": f"b{i}", "image": images[i % len(images)], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the findings in this figure."},
        {"from": "gpt", "value": answer}]})
  path = os.path.join(root, "train.json")
  with open(path, "w") as f:
    json.dump(recs, f)
  return path


def _tiny_tokenizer(root: str) -> str:
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
  from tiny_tokenizers import llama3_tokenizer
  return llama3_tokenizer(root)


def _tree_cpu() -> float:
  """CPU seconds used so far by this process and its live descendants (grain workers)."""
  tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [os.getpid()]
  while todo:
    pid = todo.pop()
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick   # utime + stime
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          todo += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
      pass
  return total


def bench_images(workers: list, batch: int, batches: int, tokenizer: str, seed: int,
                 threads: int, repeats: int) -> list:
  """Per worker count: best and median steady-state samples/s over `repeats` runs (the machine is
  shared, so the best run is the closest to an idle machine), and the CPU time per sample of all
  processes involved (robust to contention: an idle machine with C cores tops out near
  C / that time)."""
  import grain.python as gp
  from data.image import ImageGeometry
  from data.pipeline import DataConfig, make_iterator
  rows = []
  with tempfile.TemporaryDirectory() as root:
    n = batch * (batches + 2)
    path = _write_samples(root, n, _write_images(root, 48, seed), seed)
    tok = tokenizer or _tiny_tokenizer(root)
    for w in workers:
      cfg = DataConfig(paths=[path], tokenizer_dir=tok, template="llama3", max_len=MAX_LEN,
                       per_process_batch=batch, mode="pad", image_token_id=128256,
                       geometry=ImageGeometry(image_size=1134, resize_mode="pad", tiler="s2",
                                              image_tokens=IMAGE_TOKENS),
                       worker_count=w, read_threads=threads, seed=seed, num_epochs=1,
                       group_window=1)
      rates, cpu, loads = [], [], []
      for _ in range(repeats):
        it = make_iterator(cfg, shard=gp.ShardOptions(0, 1))
        first = next(it)
        t1, c1 = time.perf_counter(), _tree_cpu()
        done = sum(next(it)["input_ids"].shape[0] for _ in range(batches))   # workers still live
        t2, c2 = time.perf_counter(), _tree_cpu()
        it.close()
        rates.append(done / (t2 - t1))
        cpu.append((c2 - c1) / done)
        loads.append(os.getloadavg()[0])
      rows.append({"workers": w, "best": max(rates), "median": float(np.median(rates)),
                   "cpu_ms": 1e3 * float(np.median(cpu)),
                   "shape": list(first["pixel_values"].shape), "load_avg": loads})
  return rows


# --- report --------------------------------------------------------------------------------------

def header(argv) -> str:
  import grain
  import jax
  import PIL
  import transformers
  cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
              if ln.startswith("model name")), platform.processor())
  return "\n".join([
      f"- date: {datetime.date.today().isoformat()}",
      f"- machine: {os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}; "
      f"1-min load average at start {os.getloadavg()[0]:.1f} (the machine is shared)",
      f"- versions: python {platform.python_version()}, grain {grain.__version__}, "
      f"numpy {np.__version__}, pillow {PIL.__version__}, jax {jax.__version__}, "
      f"transformers {transformers.__version__}",
      f"- command: `python -m bench.data_pipeline {' '.join(argv)}`"])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("what", choices=["packing", "images", "all"])
  p.add_argument("--samples", type=int, default=8192, help="packing: samples of the length mix")
  p.add_argument("--batch", type=int, default=16, help="rows per batch (per process)")
  p.add_argument("--workers", default="0,1,2,3", help="images: grain worker counts to try")
  p.add_argument("--batches", type=int, default=12, help="images: batches timed per setting")
  p.add_argument("--tokenizer", default="", help="images: HF tokenizer dir (default: tiny)")
  p.add_argument("--repeats", type=int, default=3, help="images: runs per worker count")
  p.add_argument("--read-threads", type=int, default=2,
                 help="images: decode threads per process (DataConfig.read_threads)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  out = [header(argv), ""]
  if args.what in ("packing", "all"):
    out += ["Non-pad token fraction, LLaVA-Med-like lengths (729 + U[50, 700] tokens, "
            f"max_len {MAX_LEN}), {args.samples} samples, {args.batch} rows per batch:", "",
            "| batching | non-pad tokens | row lengths | samples dropped | host s |",
            "|---|---|---|---|---|"]
    for r in bench_packing(args.samples, args.batch, args.seed):
      out.append(f"| {r['case']} | {100 * r['non_pad']:.1f}% | {r['shapes']} | {r['dropped']} | "
                 f"{r['seconds']:.2f} |")
    out.append("")
  if args.what in ("images", "all"):
    workers = [int(w) for w in args.workers.split(",")]
    out += ["S2 image path (JPEG 400-1200 px -> pad-to-square -> 1134x1134 uint8, llama3 "
            f"tokenization, batches of {args.batch}, {args.read_threads} decode threads per "
            f"process), steady state after the first batch, {args.repeats} runs each:", "",
            "| grain workers | best samples/s | median samples/s | CPU ms/sample (all processes) "
            f"| idle-machine bound ({os.cpu_count()} cores / CPU per sample) "
            "| 1-min load avg after each run |", "|---|---|---|---|---|---|"]
    for r in bench_images(workers, args.batch, args.batches, args.tokenizer, args.seed,
                          args.read_threads, args.repeats):
      loads = ", ".join(f"{x:.1f}" for x in r["load_avg"])
      bound = 1e3 * os.cpu_count() / r["cpu_ms"]
      out.append(f"| {r['workers']} | {r['best']:.1f} | {r['median']:.1f} | {r['cpu_ms']:.0f} | "
                 f"{bound:.0f} | {loads} |")
    out.append("")
  print("\n".join(out))


if __name__ == "__main__":
  main()
