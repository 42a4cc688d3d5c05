"""Where a jitted step spends its GPU time: a jax.profiler trace of a few steps, summarized.

The "profile evidence" #9 and #6 ask for where a target is missed: GPU kernel time per step by
kernel name (top 25, each with its share of the step's wall time) and by category (matmul/gemm,
attention, fusion/elementwise, collective, copy/transpose, other), plus how much of the step the
device was busy at all (the rest is launch gaps or host work).

  summary = trace_steps(step, 2, "/tmp/prof", step_s=0.81)   # step() runs 2x under the profiler
  print(summary["text"])
  python -m bench.profile /tmp/prof [--steps 2] [--step-ms 810]   # summarize a trace on disk

Kernels are the complete ('X') events on a device's stream threads ("Stream #N...") in the
perfetto JSON that jax.profiler.trace(create_perfetto_trace=True) writes; the derived rows of the
device ("XLA Ops", "XLA Modules", "Steps", ...) repeat the same time and are left out. A trace
with no device (a CPU run) falls back to the host's XLA op events (those with an 'hlo_op'
argument), so the same summary works there. Parsed with the standard library only.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import time

# Ordered: the first match wins ("gemm_fusion" is a gemm, cuDNN's "..._sdpa_..._wgmma_..." and
# our Pallas "flash_fwd" are attention, "transpose_fusion" is a copy).
CATEGORIES = (
    ("collective", r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|"
                   r"collective[-_]?permute"),
    ("attention", r"flash|fmha|sdpa|attention|\bmha"),
    ("matmul/gemm", r"gemm|nvjet|cutlass|xmma|cublas|matmul|wgmma|gmma|(^|_)dot"),
    ("copy/transpose", r"memcpy|memset|copy|transpose|dynamic[-_]update[-_]slice|concatenate"),
    ("fusion/elementwise", r"fusion|reduce|loop|elementwise|convert|broadcast|triton|wrapped"),
)
_CATEGORY_RES = tuple((name, re.compile(rx, re.I)) for name, rx in CATEGORIES)
OTHER = "other"
# Device rows that summarize the stream rows (same time counted again).
DERIVED_THREADS = ("XLA Ops", "XLA Modules", "Steps", "XLA TraceMe", "TensorFlow Ops",
                   "TensorFlow Name Scope", "Framework Name Scope", "Framework Ops", "Source code",
                   "Launch Stats", "Async XLA Ops")


def category(name: str) -> str:
  for cat, rx in _CATEGORY_RES:
    if rx.search(name):
      return cat
  return OTHER


def load(path) -> list:
  """The trace events of a Chrome/perfetto JSON trace (.json or .json.gz)."""
  path = str(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  events = data.get("traceEvents", []) if isinstance(data, dict) else data
  if not isinstance(events, list):
    raise ValueError(f"{path}: no traceEvents list")
  return events


def find_trace(log_dir) -> pathlib.Path:
  """The newest perfetto_trace.json.gz (else *.trace.json.gz) under a jax.profiler log dir."""
  root = pathlib.Path(log_dir)
  if root.is_file():
    return root
  for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
    found = sorted(root.glob(f"plugins/profile/*/{pattern}"), key=os.path.getmtime)
    if found:
      return found[-1]
  raise FileNotFoundError(f"no trace under {root}/plugins/profile/")


def kernel_events(events: list) -> tuple:
  """([(name, start_us, dur_us)], source): device stream kernels, else host XLA ops."""
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") != "M":
      continue
    name = (e.get("args") or {}).get("name", "")
    if e.get("name") == "process_name":
      procs[e.get("pid")] = name
    elif e.get("name") == "thread_name":
      threads[e.get("pid"), e.get("tid")] = name
  devices = {pid for pid, n in procs.items()
             if n.startswith("/device:") and not n.startswith("/device:CPU")}
  streams = {k for k, n in threads.items() if k[0] in devices and n.startswith("Stream")}

  def on_device(e):
    key = (e.get("pid"), e.get("tid"))
    if streams:
      return key in streams
    return key[0] in devices and threads.get(key, "") not in DERIVED_THREADS

  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  kern = [e for e in complete if on_device(e)]
  source = "device kernels"
  if not kern:
    kern = [e for e in complete if "hlo_op" in (e.get("args") or {})]
    source = "host XLA ops (no device in the trace; nested ops overlap)"
  return [(e.get("name", "?"), float(e["ts"]), float(e["dur"])) for e in kern], source


def _busy(spans) -> float:
  """Length of the union of [start, start + dur) intervals (streams can overlap)."""
  total, end = 0.0, None
  for start, dur in sorted(spans):
    stop = start + dur
    if end is None or start > end:
      total += dur
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarize(events: list, steps: int, step_s: float | None = None, top: int = 25) -> dict:
  """Per-step kernel time by name and category; percentages are of `step_s` (the step's wall
  time) when given, else of the traced kernel time."""
  if steps < 1:
    raise ValueError("steps must be >= 1")
  kern, source = kernel_events(events)
  by_name = collections.defaultdict(lambda: [0, 0.0])
  by_cat = collections.defaultdict(float)
  for name, _, dur in kern:
    by_name[name][0] += 1
    by_name[name][1] += dur
    by_cat[category(name)] += dur
  total_us = sum(d for _, _, d in kern)
  busy_us = _busy([(t, d) for _, t, d in kern])
  ms = lambda us: us / 1e3 / steps
  base_ms = step_s * 1e3 if step_s else ms(total_us)
  pct = lambda x_ms: 100.0 * x_ms / base_ms if base_ms else 0.0
  rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
  return {
      "source": source, "steps": steps, "kernels": len(kern), "distinct": len(by_name),
      "step_ms": step_s * 1e3 if step_s else None, "kernel_ms": ms(total_us),
      "busy_ms": ms(busy_us), "busy_pct": pct(ms(busy_us)) if step_s else None,
      "categories": [{"category": c, "ms": ms(by_cat[c]), "pct_step": pct(ms(by_cat[c])),
                      "pct_kernel": 100.0 * by_cat[c] / total_us if total_us else 0.0}
                     for c in [name for name, _ in CATEGORIES] + [OTHER] if by_cat.get(c)],
      "top": [{"name": n, "calls": c / steps, "ms": ms(us), "pct_step": pct(ms(us)),
               "category": category(n)} for n, (c, us) in rows[:top]],
  }


def format_summary(s: dict, title: str = "") -> str:
  """Plain-text report of `summarize`'s result (fits a markdown code block)."""
  of = "step wall time" if s["step_ms"] else "traced kernel time"
  lines = [title] if title else []
  lines.append(f"{s['source']}: {s['kernels']} events ({s['distinct']} distinct) over "
               f"{s['steps']} steps; per step: kernels {s['kernel_ms']:.2f} ms, device busy "
               f"{s['busy_ms']:.2f} ms" + (f" of {s['step_ms']:.2f} ms wall "
                                             f"({s['busy_pct']:.1f}% busy)" if s["step_ms"] else ""))
  lines += ["", f"by category (ms per step, % of {of}, % of kernel time):"]
  for c in s["categories"]:
    lines.append(f"  {c['category']:<20} {c['ms']:10.3f} ms {c['pct_step']:6.1f}% "
                 f"{c['pct_kernel']:6.1f}%")
  lines += ["", f"top {len(s['top'])} kernels (calls per step, ms per step, % of {of}):"]
  for r in s["top"]:
    name = r["name"] if len(r["name"]) <= 100 else r["name"][:97] + "..."
    lines.append(f"  {r['calls']:7.1f} {r['ms']:10.3f} ms {r['pct_step']:6.1f}%  "
                 f"[{r['category']}] {name}")
  return "\n".join(lines)


def trace_steps(step, n: int, log_dir, *, step_s: float | None = None, sync=None,
                title: str = "") -> dict:
  """Run `step()` n times under jax.profiler.trace and summarize the kernels. `step` returns
  what `sync` (default jax.block_until_ready) waits on; `step_s` is the untraced step time that
  percentages refer to (default: the traced wall time per step, which includes profiler cost)."""
  import jax
  sync = sync or jax.block_until_ready
  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
    t = time.perf_counter()
    out = None
    for _ in range(n):
      out = step()
    sync(out)
    traced = (time.perf_counter() - t) / n
  path = find_trace(log_dir)
  s = summarize(load(path), n, step_s or traced)
  s.update(trace=str(path), traced_step_ms=traced * 1e3)
  s["text"] = format_summary(s, title)
  return s


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("trace", help="a jax.profiler log dir or a .json / .json.gz trace file")
  p.add_argument("--steps", type=int, default=1, help="steps the trace holds")
  p.add_argument("--step-ms", type=float, default=None, help="wall time of one step")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  path = find_trace(args.trace)
  s = summarize(load(path), args.steps, args.step_ms / 1e3 if args.step_ms else None, args.top)
  print(format_summary(s, str(path)))


if __name__ == "__main__":
  main()
