"""Every owed GPU measurement (#6, #9, #10) in one or two prepared runs under a hard deadline.

  python -m bench.suite --out DIR --budget 560 --part 1     # first call on a lent H200
  python -m bench.suite --out DIR --budget 200 --part 2     # right after (the machine is warm)
  python -m bench.suite --out DIR --budget 580 --stages gen-layout e2e ablations xla-flags  # later
  python -m bench.suite --list                              # the plan and its estimates
  python -m bench.suite --out /tmp/s --budget 600 --smoke --stages vision   # CPU check, tiny shapes

Stages run in priority order, each one benchmark command in its own process group with its own
timeout. A stage whose a-priori estimate exceeds the budget left is skipped and the reason is
recorded; the last stage that runs gets at most what is left, so the suite ends inside --budget.
When a stage ends, its status line and the benchmark's own JSON results are appended to
DIR/results.jsonl (the environment is its first line), and DIR/summary.md is rewritten with all
tables so far; its output is streamed into DIR/log.txt while it runs. A run killed from outside
still leaves everything that finished. --part 2 also runs part-1 stages that part 1 skipped or never
reached on this machine (state in --work). The runbook is the last section of docs/benchmarks.md.

Priority (#9's acceptance letters): (1) #9 (a) LoRA LLM step, both sides, with a kernel profile
of ours (#9 acceptance 3; the tower gets one too); (2) #9 (b) S2 tower; (3) #6 attention at
S=2048/4096 + packed; (4) #10 generation at batch 32 and 1; (5) #9 (c) full LoRA stage-2 and
stage-1 steps; (6) #9 (d) grain-fed end-to-end run (bench/train_e2e.py); (7) #9 acceptance 2,
ablations of our step at 4 decoder layers; (8) XLA:GPU flag sets (bench/xla_flags.py) on the
same 4-layer step, and dynamic-slice fusion on the scanned generation layout (in gen-layout).

Stage list, estimates and their reasoning: bench/suite_stages.py.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import sys
import time

from bench import suite_aot
from bench.suite_process import RUNNING, kill_group, run_command
from bench.suite_report import environment, stage_markdown, stage_note, summary
from bench.suite_stages import BY_NAME, STAGES, command, shown


RESERVE_S = 5.0   # kept back from the budget to write the summary


def _state_path(work):
  return os.path.join(work, "state.jsonl")


def _read_state(work) -> list:
  try:
    with open(_state_path(work)) as f:
      return [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return []


def _write_state(work, obj):
  with open(_state_path(work), "a") as f:
    f.write(json.dumps(obj) + "\n")


def plan(part: str, names=None, work: str = "") -> list:
  """Stages to run, in priority order. --part 2 first takes part-1 stages that the last part-1 run
  on this machine skipped or never reached."""
  if names:
    return [BY_NAME[n] for n in names]
  if part == "all":
    return list(STAGES)
  chosen = [s for s in STAGES if s.part == int(part)]
  if part == "2" and work:
    state = _read_state(work)
    runs = [i for i, r in enumerate(state) if r.get("run") == "1"]
    if runs:
      planned = state[runs[-1]]["planned"]
      # started counts as done (a stage the outer timeout killed would likely be killed again)
      done = {r["stage"] for r in state[runs[-1]:] if "stage" in r and r["status"] != "skipped"}
      chosen = [BY_NAME[n] for n in planned if n not in done and n in BY_NAME] + chosen
  return chosen


# --- driver --------------------------------------------------------------------------------------

def run(stages, out: str, budget: float, *, smoke: bool = False, work: str, argv=(), part="",
        commands=None, log=print) -> list:
  """Run `stages` in order inside `budget` seconds; -> the stage rows. `commands` overrides
  a stage's command line ({name: argv}), for tests."""
  t0 = time.monotonic()
  deadline = t0 + budget
  os.makedirs(out, exist_ok=True)
  os.makedirs(work, exist_ok=True)
  env = environment()
  child_env = dict(os.environ, PYTHONUNBUFFERED="1")
  cache = ""
  if not smoke:
    cache = child_env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(work, "jax-cache"))
  results_path = os.path.join(out, "results.jsonl")
  with open(results_path, "a") as f:
    f.write(json.dumps(dict(env, argv=list(argv), budget_s=budget)) + "\n")
  if part == "1":
    _write_state(work, {"run": "1", "planned": [s.name for s in stages]})
  rows, sections = [], []
  aot = suite_aot.verdicts(work)   # `--aot-check TARGET` wrote them before the device was lent

  def write_summary():
    text = summary(env, rows, sections, list(argv), budget, time.monotonic() - t0, cache)
    with open(os.path.join(out, "summary.md"), "w") as f:
      f.write(text)

  with open(os.path.join(out, "log.txt"), "a") as logf:
    for stage in stages:
      cmd = (commands or {}).get(stage.name) or command(stage, smoke, work)
      est = stage.smoke_estimate_s if smoke else stage.estimate_s
      row = {"kind": "stage", "stage": stage.name, "measures": stage.measures,
             "command": shown(cmd), "estimate_s": est, "wall_s": None}
      left = deadline - time.monotonic() - RESERVE_S
      res = {}
      if smoke and stage.smoke_args is None and stage.name not in (commands or {}):
        row.update(status="skipped", reason="no smoke form")
      elif stage.name not in (commands or {}) and importlib.util.find_spec(stage.args[0]) is None:
        row.update(status="skipped", reason=f"{stage.args[0]} is not in this tree")
      elif aot.get(stage.name, {}).get("fits") is False:
        row.update(status="skipped", reason=suite_aot.skip_reason(aot[stage.name]))
      elif left < est:
        row.update(status="skipped",
                   reason=f"needs ~{est:.0f} s by its estimate, {max(left, 0):.0f} s of the "
                          "budget left")
      else:
        timeout = min(stage.timeout_s, left)
        log(f"bench.suite: {stage.name}: {shown(cmd)} (estimate {est:.0f} s, timeout "
            f"{timeout:.0f} s, {left:.0f} s left)")
        logf.write(f"\n=== {stage.name} {datetime.datetime.now().isoformat(timespec='seconds')}"
                   f": {shown(cmd)} (timeout {timeout:.0f} s)\n")
        logf.flush()
        _write_state(work, {"stage": stage.name, "status": None})
        res = run_command(cmd, timeout, logf, child_env)
        row.update(status=res["status"], rc=res["rc"], wall_s=res["wall_s"], timeout_s=timeout)
        if res["status"] == "timeout":
          row["reason"] = f"killed after {timeout:.0f} s"
        logf.write(f"=== {stage.name}: {res['status']} (exit {res['rc']}) after "
                   f"{res['wall_s']:.1f} s\n")
        logf.flush()
        sections.append((stage.name, shown(cmd), stage_markdown(stage, res, cmd)))
      row["note"] = stage_note(row, res)
      rows.append(row)
      _write_state(work, {"stage": stage.name, "status": row["status"]})
      with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
        for rec in res.get("records", []):
          f.write(json.dumps({"kind": "result", "stage": stage.name, **rec}) + "\n")
      log(f"bench.suite: {stage.name}: {row['status']}"
          + (f" in {row['wall_s']:.0f} s" if row.get("wall_s") is not None else "")
          + (f" ({row['note']})" if row.get("note") else ""))
      write_summary()
  write_summary()
  return rows


def parser():
  p = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="results.jsonl, log.txt and summary.md go here ($OUT on the device)")
  p.add_argument("--budget", type=float, default=560.0,
                 help="seconds for the whole run; stages that do not fit are skipped")
  p.add_argument("--part", choices=("1", "2", "all"), default="all")
  p.add_argument("--stages", nargs="+", choices=list(BY_NAME), default=None,
                 help="run exactly these, in this order (overrides --part)")
  p.add_argument("--work", default="/tmp/medvlm-bench-suite",
                 help="traces, the JAX compilation cache and the part-1 state (kept across calls "
                      "on a warm machine)")
  p.add_argument("--smoke", action="store_true", help="each benchmark's --smoke form, on CPU")
  p.add_argument("--list", action="store_true", help="print the plan and exit")
  p.add_argument("--aot-check", metavar="TARGET", default=None,
                 help="on the CPU host, before a device is lent: compile each training-step "
                      "stage for TARGET with train.aot (bench/suite_aot.py); later runs with the "
                      "same --work skip the stages that do not fit")
  return p


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(argv)
  stages = plan(args.part, args.stages, args.work)
  if args.list:
    total = 0.0
    for s in stages:
      total += s.estimate_s
      print(f"{s.name:<10} part {s.part}  ~{s.estimate_s:4.0f} s (timeout {s.timeout_s:.0f})  "
            f"sum {total:4.0f} s  {s.measures}\n  {shown(command(s, args.smoke, args.work))}")
    return
  if args.aot_check:
    suite_aot.check([s.name for s in stages], args.aot_check, args.work, args.smoke,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    return
  if not args.out:
    parser().error("--out is required")

  def stop(signum, _frame):   # the run tool's timeout: end the stage's group, keep what finished
    for proc in list(RUNNING):
      kill_group(proc, grace=2.0)
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, stop)
  rows = run(stages, args.out, args.budget, smoke=args.smoke, work=args.work, argv=argv,
             part=args.part if not args.stages else "",
             log=lambda m: print(m, file=sys.stderr, flush=True))
  print("\n".join(f"{r['stage']}: {r['status']}" + (f" ({r['note']})" if r.get("note") else "")
                  for r in rows))


if __name__ == "__main__":
  main()
