"""bench.suite's records: the environment line, each stage's markdown (its own table, or one
from the JSON results of a stage that was killed) and summary.md."""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import shlex
import subprocess
import sys

from bench.suite_process import ROOT, json_record
from bench.suite_stages import Stage


PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax",
            "optax", "orbax-checkpoint", "torch", "transformers", "peft", "triton", "numpy",
            "ml-collections", "grain", "einops")


def environment() -> dict:
  """Device, driver and package versions without starting any framework (children own the GPU)."""
  env = {"kind": "env", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "python": platform.python_version(), "machine": platform.machine(),
      "versions": {}}
  for name in PACKAGES:
    try:
      env["versions"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    cells = [c.strip() for c in q.stdout.strip().splitlines()[0].split(",")] if q.stdout.strip() \
        else []
    env["gpu"] = (f"{cells[0]}, driver {cells[1]}, {cells[2]}" if len(cells) == 3 else
                  q.stdout.strip() or q.stderr.strip())
    head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    cuda = re.search(r"CUDA Version:\s*(\S+)", head)
    env["cuda"] = cuda.group(1) if cuda else None
  except (OSError, subprocess.SubprocessError) as e:
    env["gpu"] = f"no nvidia-smi ({type(e).__name__})"
  try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return env


def _generic_table(records) -> str:
  keys = []
  for r in records:
    keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
  if not keys:
    return ""
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")
  return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"] +
                   ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in records])


def partial_table(stage: Stage, cmd, records) -> str:
  """A table from the JSON results of a stage that did not print its own (timed out, killed)."""
  results = [r for r in records if r.get("kind") != "stage"]
  if not results:
    return ""
  if stage.render in ("train_step", "ablations", "xla_flags"):
    from bench import step_tables, train_step
    try:
      args = train_step.parse_args(cmd[3:])
      if stage.render != "train_step":
        render = (step_tables.ablation_table if stage.render == "ablations" else
                  step_tables.xla_flags_table)
        return render(args, [r for r in results if "variant" in r], cmd[3:])
      return step_tables.table(args, [r for r in results if "case" in r and "side" in r], cmd[3:])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - argparse exits; use the plain table
      print(f"bench.suite: {stage.name}: could not render its table: {e}", file=sys.stderr)
  return _generic_table(results)


def stage_markdown(stage: Stage, res: dict, cmd) -> str:
  """The stage's own report: its stdout without JSON lines; else a table from its results,
  plus any markdown it printed as progress on stderr."""
  own = "\n".join(l for l in res.get("stdout", "").splitlines() if json_record(l) is None).strip()
  if own and res["status"] == "ok":
    return own
  parts = [own] if own else []
  table = partial_table(stage, cmd, res.get("records", []))
  if table:
    parts.append(table)
  progress = [l for l in res.get("stderr", "").splitlines() if l.startswith(("|", "### "))]
  if progress and not table:
    parts.append("\n".join(progress))
  return "\n\n".join(parts)


def stage_note(stage_row: dict, res: dict) -> str:
  if stage_row["status"] == "skipped":
    return stage_row["reason"]
  notes = [r["note"] for r in res.get("records", []) if r.get("note")]
  text = stage_row.get("reason", "")
  if stage_row["status"] == "failed":
    text = ((res.get("stderr", "").strip().splitlines() or ["?"])[-1])[:160]
  if notes:
    text = (text + f" {len(notes)} result note(s), first: {notes[0][:120]}").strip()
  return text.replace("|", "/")


def summary(env: dict, rows: list, sections: list, argv, budget: float, used: float,
            cache: str) -> str:
  v = env.get("versions", {})
  vers = ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v)
  lines = [f"# Owed GPU measurements: `{shlex.join(['python', '-m', 'bench.suite'] + argv)}`", "",
           f"- device: {env.get('gpu', '?')}; CUDA {env.get('cuda') or '?'} (nvidia-smi)",
           f"- versions: {vers}, python {env.get('python')}",
           f"- date: {env.get('date')}" + (f"; commit {env['commit']}" if env.get("commit") else ""),
           f"- budget {budget:.0f} s, used {used:.0f} s; a stage's wall time includes its process "
           "start-ups and compiles" + (f"; JAX compilation cache {cache}" if cache else ""), "",
           "| stage | measures | status | wall s | estimate s | note |", "|---" * 6 + "|"]
  for r in rows:
    wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-"
    lines.append(f"| {r['stage']} | {r['measures']} | {r['status']} | {wall} | "
                 f"{r['estimate_s']:.0f} | {r.get('note', '')} |")
  for name, cmd, text in sections:
    lines += ["", f"## Stage {name}", "", f"Command: `{cmd}`", "", text or "(no output)"]
  return "\n".join(lines) + "\n"
