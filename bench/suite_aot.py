"""bench.suite's fit check: before a lent device's minutes go to a training-step stage, train.aot
compiles that stage's step (the config bench.step_ours builds from the stage's own arguments) for
the device on this CPU host.

  python -m bench.suite --aot-check h200 --work DIR [--stages ...]   # on the CPU host, first

writes DIR/aot.jsonl; a later `python -m bench.suite --work DIR ...` (the same --work, e.g.
carried to the device) skips a stage whose step does not fit, with the peak in its reason. The
check compiles the step with the batch train.main ships (positions and segment ids included), so
its peak is an upper bound on the benchmark's, which feeds no segment ids. Stages other than
single-case bench.train_step runs (llm, lora, stage1) are not checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

CHECKED = ("llm", "lora", "stage1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _path(work: str) -> str:
  return os.path.join(work, "aot.jsonl")


def stage_config(name: str, smoke: bool = False):
  """The train.main config of a bench.train_step stage (bench.step_ours._train_config), with
  the data shapes of its batch; None for a stage that is not one case of bench.train_step."""
  from bench.step_cases import arch
  from bench.step_ours import _train_config
  from bench.suite_stages import BY_NAME
  from bench.train_step import parse_args
  stage = BY_NAME[name]
  argv = stage.smoke_args if smoke else stage.args
  if not argv or argv[0] != "bench.train_step":
    return None
  rest = [a.replace("{work}", "/tmp") for a in argv[1:]]
  a = parse_args(rest)
  if len(a.cases) != 1 or a.cases[0] not in CHECKED or a.ablate or a.xla_flags:
    return None
  case = a.cases[0]
  c = _train_config(a, case, arch(a, case), a.warmup + a.steps)
  c.data.update(max_len=a.seq, global_batch=a.micro_batch, mode="pad",
                max_images_per_row=0 if case == "llm" else 1)
  return c


def check(names, target: str, work: str, smoke: bool = False, log=print) -> list:
  """Compile each stage's step for `target` (one train.aot process each); rows go to
  WORK/aot.jsonl as they come."""
  os.makedirs(os.path.join(work, "aot"), exist_ok=True)
  rows = []
  for name in names:
    if stage_config(name, smoke) is None:
      continue
    cfg = os.path.join(work, "aot", f"{name}.py")
    with open(cfg, "w") as f:
      f.write("def get_config():\n  from bench.suite_aot import stage_config\n"
              f"  return stage_config({name!r}, {smoke!r})\n")
    p = subprocess.run([sys.executable, "-m", "train.aot", "--config", cfg, "--target", target,
                        "--programs", "train", "--json"], cwd=ROOT, capture_output=True, text=True)
    row = {"stage": name, "target": target, "exit": p.returncode}
    try:
      step = json.loads(p.stdout.strip().splitlines()[-1])["programs"][0]
      row.update(fits=step.get("fits"), compile_s=step.get("compile_s"),
                 peak=(step.get("memory") or {}).get("peak"), limit=step.get("limit"),
                 error=step.get("error"))
    except (ValueError, IndexError, KeyError):
      row.update(fits=None, error=(p.stderr.strip().splitlines() or ["no output"])[-1][:300])
    rows.append(row)
    with open(_path(work), "a") as f:
      f.write(json.dumps(row) + "\n")
    log(f"bench.suite: aot {name} on {target}: " + (
        "fits" if row["fits"] else "DOES NOT FIT" if row["fits"] is False else
        f"not checked ({row['error']})"))
  return rows


def verdicts(work: str) -> dict:
  """{stage: the newest aot.jsonl row}."""
  out = {}
  try:
    with open(_path(work)) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          out[r["stage"]] = r
  except (OSError, ValueError):
    pass
  return out


def skip_reason(row) -> str:
  peak = f"peak {row['peak'] / 2**30:.1f} GiB of {row['limit'] / 2**30:.1f} GiB" if row.get(
      "peak") else (row.get("error") or "")[:120]
  return f"does not fit on {row['target']} by train.aot ({peak})"
