"""docs/benchmarks.md's "Compiled for the target (no device)": every paper recipe compiled by
`python -m train.aot` for its hardware, one process per case, in order (GPU targets first),
each writing its JSON report to docs/aot/<case>.json (a case with a report is skipped unless
--force); `--render` prints the markdown table from
whatever JSON exists (cases not compiled yet are listed with their command, never guessed).

  python -m bench.aot_table [--cases NAME ...] [--out docs/aot]   # `make aot`
  python -m bench.aot_table --render
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

# (case, config, target, extra train.aot arguments)
CASES = (
    ("stage2-h100x8", "configs/stage2.py", "h100x8", ()),
    ("stage1-h100x8", "configs/stage1.py", "h100x8", ()),
    ("ldrt15-a40x4", "configs/ldrt_llava15_lora.py", "a40x4", ()),
    ("stage2-v5p-8", "configs/stage2.py", "v5p-8", ()),
    ("ldrt16-a40x4", "configs/ldrt_llava16_lora.py", "a40x4", ()),
    ("stage1-v5p-8", "configs/stage1.py", "v5p-8", ()),
    ("ldrt15-h100", "configs/ldrt_llava15_lora.py", "h100", ()),
    ("stage2-v6e-8", "configs/stage2.py", "v6e-8", ()),
    ("ldrt16-h100", "configs/ldrt_llava16_lora.py", "h100", ()),
    ("stage1-v6e-8", "configs/stage1.py", "v6e-8", ()),
    ("ldrt15-h200", "configs/ldrt_llava15_lora.py", "h200", ()),
    ("ldrt16-h200", "configs/ldrt_llava16_lora.py", "h200", ()),
    ("stage2_lora-h100", "configs/stage2_lora.py", "h100", ()),
    ("stage2-h100x8-search", "configs/stage2.py", "h100x8", ("--search",)),
    ("stage2-v5p-8-search", "configs/stage2.py", "v5p-8", ("--search",)),
)


def command(case) -> list:
  _, config, target, extra = case
  return ["python", "-m", "train.aot", "--config", config, "--target", target, "--json",
          "--programs", "train", *extra]


def run(cases, out: str, force: bool = False):
  os.makedirs(out, exist_ok=True)
  for case in cases:
    if not force and os.path.exists(os.path.join(out, case[0] + ".json")):
      continue   # compiled before: --force compiles it again
    cmd = ["nice", "-n", "10", sys.executable] + command(case)[1:]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = (p.stdout.strip().splitlines() or [""])[-1]
    try:
      rep = json.loads(line)
    except json.JSONDecodeError:
      rep = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    rep.update(case=case[0], command=" ".join(map(shlex.quote, command(case))), wall_s=round(
        time.time() - t, 1), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="minutes"), exit=p.returncode)
    with open(os.path.join(out, case[0] + ".json"), "w") as f:
      json.dump(rep, f, indent=1)
    print(case[0], rep.get("wall_s"), "exit", p.returncode, flush=True)


def _gib(n) -> str:
  return f"{n / 2**30:.1f}"


def render(out: str) -> str:
  rows = ["| case | config | target | peak GiB / device (of usable) | fits | model FLOPs / step | "
          "estimate s / step (roofline) | compile s | date, versions |",
          "|---|---|---|---|---|---|---|---|---|"]
  missing, searches = [], []
  for case in CASES:
    path = os.path.join(out, case[0] + ".json")
    if not os.path.exists(path):
      missing.append(case)
      continue
    with open(path) as f:
      r = json.load(f)
    if "rows" in r:
      searches.append(r)
      continue
    prog = (r.get("programs") or [{}])[0]
    if "memory" not in prog:
      rows.append(f"| {case[0]} | {case[1]} | {case[2]} | did not compile: "
                  f"{prog.get('error') or r.get('error')} | | | | {r['wall_s']} | {r['date']} |")
      continue
    v = r["versions"]
    est = prog.get("estimate", {}).get("step_s")
    rows.append(f"| {case[0]} | {case[1]} | {case[2]} | {_gib(prog['memory']['peak'])} "
                f"({_gib(prog['limit'])}) | {'yes' if prog['fits'] else 'NO'} "
                f"({prog['headroom'] * 100:.0f}% free) | {prog['model_flops']:.3g} | "
                f"{est:.2f} | {prog['compile_s']}{' (cuBLAS retry)' if prog.get('note') else ''}"
                f" | {r['date']}, jax {v['jax']}, "
                f"{', '.join(f'{k} {x}' for k, x in v.items() if k != 'jax')} |")
  text = "\n".join(rows)
  for s in searches:
    c = s["choice"]
    text += (f"\n\n`--search` {s['config']} on {s['target']}: " +
             (f"remat {c['remat']}, micro-batch {c['micro_batch']} per device (grad_accum "
              f"{c['grad_accum']}), peak {_gib(c['peak'])} GiB" if c else "nothing fits") +
             f" ({len(s['rows'])} settings compiled, {s['wall_s']} s in all; {s['date']}).")
  if missing:
    text += "\n\nNot compiled yet (run each to fill its row):\n" + "\n".join(
        f"- {m[0]}: `{' '.join(command(m))}`" for m in missing)
  return text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="*", help="case names (default: all)")
  p.add_argument("--out", default="docs/aot")
  p.add_argument("--render", action="store_true")
  p.add_argument("--force", action="store_true", help="compile cases that have a report too")
  a = p.parse_args(argv)
  if a.render:
    print(render(a.out))
    return
  names = {c[0] for c in CASES}
  bad = set(a.cases or ()) - names
  if bad:
    p.error(f"unknown cases {sorted(bad)}; known: {sorted(names)}")
  run([c for c in CASES if not a.cases or c[0] in a.cases], a.out, a.force)


if __name__ == "__main__":
  main()
