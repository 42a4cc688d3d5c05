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

Estimates (seconds of wall time on one H200, process start-ups and compiles included). Nothing
has been measured on this machine yet: these are a-priori; replace them with the `wall_s` that
results.jsonl records. Building blocks:
- a JAX process (python, jax/flax/optax/orbax and ours imported on a cold machine, CUDA client
  up) ~10 s; a torch process (torch, transformers, peft, CUDA context) ~8 s;
- weights: bench/weights.py fills 16 GB of bf16 in one elementwise program (~3 s with its
  compile); HF builds Llama-3-8B on the GPU in bf16 with its init kernels in ~5 s;
- our 8B LoRA step's XLA compile: the decoder is one nn.scan, so the program is one remat'ed
  layer forward + backward, the chunked-loss scan and AdamW whatever the depth: ~20 s of
  compile + ~25 s of gemm autotuning the first time. Every stage shares JAX_COMPILATION_CACHE_DIR
  (in --work), which also keeps XLA's per-fusion autotune results: later programs with the same
  gemm shapes (stage-2, stage-1, the ablations) skip most of that autotuning (~20-30 s each);
- step times from the issue's H100 figures (an H200 computes at H100 speed): ours ~1.4 s per
  8 x 2048 step (12,885 tokens/s for the scanned decoder + ~0.1 s of LM head and loss), the
  PyTorch reference ~3.6 s (4,537 tokens/s), the S2 tower ~0.25 s per 8 images (33.9 images/s).
Stages (warm-up 2 + 3 timed steps for the 8B steps):
- llm 120: ours 10 + 3 + 45 + 5 x 1.4 + 2 traced steps and the trace export ~12 = 77;
  reference 8 + 5 + 5 x 3.6 = 31.
- vision 60: ours 10 + 25 (the tower at three tile batches: its own gemms) + 7 x 0.25 + profile
  ~5 = 42; reference 8 + 2 + 7 x 0.25 = 12.
- attention 115: 15 to start (JAX + torch); per configuration (S=2048, 4096, packed 2048, 4096)
  cuDNN 2 x 2 s, XLA 2 x 2 s and Pallas 4 + 6 s (three Triton kernels) of compile, then 2 warm-up
  + 3 x 10 calls per function (XLA's fwd+bwd at S=4096 ~40 ms) ~3 s: 4 x 21 = 84; torch SDPA ~5;
  kernel profiles of Pallas and cuDNN fwd+bwd at S=4096 (3 traced calls each) ~5.
- gen-b32 155: JAX 10 + 3 + ~45 (prefill + decode loop; generation unrolls the 32 layers, see
  serve/generate.py, so the two programs take longer to compile than a scanned step) + 2 runs x
  ~3.5 s = 65; HF with a static
  cache 8 + 5 + ~60 (generate torch.compiles the decode step for static caches) + 2 full runs x
  7.7 s (1,065 tokens/s) + 3 one-token runs ~3 = 90.
- gen-b1 100: JAX 65; HF dynamic cache 8 + 5 + a 16-token warm-up + 3 one-token runs ~3 + one
  256-token run at 14.6 tokens/s = 17.5: ~35.
- gen-layout 120 (part 2): JAX alone, scanned layers at batch 1, once as is and once with
  --xla_gpu_enable_dynamic_slice_fusion (does XLA then read the weight stack in place, which
  would make the per-layer layout unnecessary?): 2 x (10 + 3 + ~25 + 2 runs x ~4 s) + ~20.
- lora 95: ours 10 + 5 + ~35 (autotune mostly cached) + 5 x 1.7 = 59; reference 8 + 5 + 5 x 3.9.
- stage1 90: like lora, no adapters (backward through the frozen LLM for activations only).
- e2e 150: llama3_med at 16 of its 32 decoder layers (say so with the figure), LoRA stage 2,
  8 x 2048, length-grouping window 8 so the 16 timed steps include two window refills: start,
  48 JPEGs, demo tokenizer, plan and weight fill ~30, compile 40-60, 24 grain-fed + 18
  device-resident steps x ~1.1 s, the pipeline alone ~3.
- ablations 110: one process, 4 decoder layers (same widths; step ~0.3 s): start 13, ten variants (+ base)
  compiled 4 at a time with cached autotune ~2 x 30 s, then each variant's weights and 6 steps ~4 s.
- xla-flags 240: five flag sets, each its own process and compile (the compilation cache keys on
  XLA_FLAGS; the per-fusion autotune results still carry over): 5 x (10 + 3 + ~30 + 7 x 0.3 s).
Part 1 (llm, vision, attention, gen-b32, gen-b1) sums to 550 s: `--budget 560` and the run tool's
timeout_s 590 fit one 10-minute call. Part 2 sums to 805 s, more than the ~3 minutes a 15-minute
lease leaves after part 1 and the machine's start: it runs in order what fits (lora, stage1), and
the rest (gen-layout, e2e, ablations, xla-flags) waits for the next lent session
(`--stages gen-layout e2e ablations xla-flags`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESERVE_S = 5.0   # kept back from the budget to write the summary
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax",
            "optax", "orbax-checkpoint", "torch", "transformers", "peft", "triton", "numpy",
            "ml-collections", "grain", "einops")
ABLATIONS = ("base", "remat=none", "remat=save_dots", "remat=save_attn_proj", "loss_chunk=0",
             "attention=xla", "attention=pallas", "attention=cudnn", "frozen_dtype=float32",
             "lora_dropout=0", "prng_impl=rbg")  # dropout's cost, and with rbg's masks
XLA_SETS = ("base", "dynamic_slice_fusion", "cublas_gemms", "latency_hiding",
            "while_double_buffer")   # bench/xla_flags.py


@dataclasses.dataclass(frozen=True)
class Stage:
  """One benchmark command. args / smoke_args follow `python -m`; "{work}" is the work dir.
  render: how partial JSON results become a table when the command did not print its own
  ("train_step", "ablations", "xla_flags", or "" for a plain key/value table)."""
  name: str
  part: int
  measures: str
  args: tuple
  estimate_s: float
  timeout_s: float
  smoke_args: tuple | None = None
  render: str = ""
  smoke_estimate_s: float = 40.0


STEP = ("bench.train_step", "--steps", "3", "--warmup", "2", "--timeout", "180")
STAGES = (
    Stage("llm", 1, "#9 acc. (a): LoRA LLM step, micro-batch 8, seq 2048, both sides + profile",
          STEP + ("--cases", "llm", "--profile", "{work}/profile"), 120, 300,
          ("bench.train_step", "--smoke", "--cases", "llm", "--profile", "{work}/profile"),
          render="train_step"),
    Stage("vision", 1, "#9 acc. (b): S2 ViT-H tower, both sides + profile",
          ("bench.train_step", "--steps", "5", "--warmup", "2", "--timeout", "120", "--cases",
           "vision", "--profile", "{work}/profile"), 60, 200,
          ("bench.train_step", "--smoke", "--cases", "vision"), render="train_step"),
    Stage("attention", 1, "#6 acc. 3: attention fwd, fwd+bwd, S=2048/4096 + packed: Pallas, "
          "cuDNN, XLA, torch SDPA",
          ("bench.attention", "--seqs", "2048", "4096", "--packed-seqs", "2048", "4096",
           "--iters", "10", "--warmup", "2", "--profile", "{work}/profile/attention"), 115, 240,
          ("bench.attention", "--smoke")),
    Stage("gen-b32", 1, "#10 acc. 6: generation, batch 32, JAX vs HF (static cache)",
          ("bench.generate", "--batch", "32", "--repeats", "1"), 155, 280,
          ("bench.generate", "--smoke", "--impl", "jax")),
    Stage("gen-b1", 1, "#10 acc. 6: generation, batch 1, JAX vs HF (dynamic cache)",
          ("bench.generate", "--batch", "1", "--repeats", "1"), 100, 220,
          ("bench.generate", "--smoke")),
    Stage("lora", 2, "#9 acc. (c): full stage-2 LoRA step (tower + connector + LLM), both sides",
          STEP + ("--cases", "lora"), 95, 300, ("bench.train_step", "--smoke", "--cases", "lora"),
          render="train_step"),
    Stage("stage1", 2, "#9 acc. (c): stage-1 step (connector trains), both sides",
          STEP + ("--cases", "stage1"), 90, 300,
          ("bench.train_step", "--smoke", "--cases", "stage1"), render="train_step"),
    Stage("gen-layout", 2, "#10: the scanned-layer layout at batch 1 (gen-b1 runs the per-layer "
          "default): the effect of serve.generate's layout choice",
          ("bench.generate", "--batch", "1", "--repeats", "1", "--impl", "jax", "--layout",
           "scan", "--xla-flags", "base", "dynamic_slice_fusion"), 120, 260,
          ("bench.generate", "--smoke", "--impl", "jax", "--layout", "scan", "--xla-flags",
           "base", "dynamic_slice_fusion")),
    Stage("e2e", 2, "#9 acc. (d): end-to-end, grain-fed train loop vs device-resident step",
          ("bench.train_e2e", "--layers", "16", "--group-window", "8", "--warmup", "8", "--steps",
           "16", "--json"), 150, 420,
          ("bench.train_e2e", "--smoke", "--json")),
    Stage("ablations", 2, "#9 acc. 2: effect of each optimization (ablations), 4 decoder layers",
          ("bench.train_step", "--cases", "llm", "--side", "ours", "--layers", "4", "--steps", "5",
           "--warmup", "2", "--compile-threads", "4", "--json", "--ablate") + ABLATIONS, 110, 300,
          ("bench.train_step", "--smoke", "--cases", "llm", "--side", "ours", "--layers", "1",
           "--json", "--ablate", "base", "loss_chunk=0"), render="ablations"),
    Stage("xla-flags", 2, "#9 build: XLA:GPU flag sets A/B, ours, 4 decoder layers",
          ("bench.train_step", "--cases", "llm", "--side", "ours", "--layers", "4", "--steps", "5",
           "--warmup", "2", "--timeout", "120", "--json", "--xla-flags") + XLA_SETS, 240, 400,
          ("bench.train_step", "--smoke", "--cases", "llm", "--side", "ours", "--json",
           "--xla-flags", "base", "dynamic_slice_fusion"), render="xla_flags"),
)
BY_NAME = {s.name: s for s in STAGES}


# --- environment ---------------------------------------------------------------------------------

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


# --- running one stage ---------------------------------------------------------------------------

def _records(line: str):
  line = line.strip()
  if not line.startswith("{"):
    return None
  try:
    obj = json.loads(line)
  except ValueError:
    return None
  return obj if isinstance(obj, dict) else None


def run_command(cmd, timeout: float, log, env=None) -> dict:
  """Run cmd in its own process group, streaming stdout and stderr into `log` as they come.
  On timeout the whole group (the benchmark's own children too) gets SIGTERM, then SIGKILL.
  -> {status: ok | failed | timeout, rc, wall_s, stdout, stderr, records (JSON-object lines)}."""
  t = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", bufsize=1, start_new_session=True)
  _CURRENT.append(proc)
  out, err, records, lock = [], [], [], threading.Lock()

  def pump(stream, sink):
    for line in stream:
      with lock:
        sink.append(line)
        log.write(line)
        log.flush()
        rec = _records(line)
        if rec is not None:
          records.append(rec)
  threads = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
  for th in threads:
    th.start()
  status = "ok"
  try:
    proc.wait(timeout=max(timeout, 0.1))
  except subprocess.TimeoutExpired:
    status = "timeout"
    _kill(proc)
  finally:
    _CURRENT.remove(proc)
  try:   # a benchmark's own children that outlived it would hold the pipes open
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  for th in threads:
    th.join(timeout=5)
  rc = proc.returncode
  if status == "ok" and rc != 0:
    status = "failed"
  return {"status": status, "rc": rc, "wall_s": time.monotonic() - t, "stdout": "".join(out),
          "stderr": "".join(err), "records": records}


_CURRENT: list = []   # the running stage's process, for the SIGTERM handler


def _kill(proc, grace: float = 5.0):
  """SIGTERM to the stage's process group, then SIGKILL to whatever of it is left."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
      pass


# --- plan, state, summary --------------------------------------------------------------------------

def command(stage: Stage, smoke: bool, work: str) -> list:
  args = stage.smoke_args if smoke else stage.args
  return [sys.executable, "-m"] + [a.replace("{work}", work) for a in args]


def shown(cmd) -> str:
  """The command as a person types it (python, not this interpreter's path)."""
  return shlex.join(["python"] + list(cmd[1:]))


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


def _generic_table(records) -> str:
  keys = []
  for r in records:
    keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
  if not keys:
    return ""
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")
  return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"] +
                   ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in records])


def _partial(stage: Stage, cmd, records) -> str:
  """A table from the JSON results of a stage that did not print its own (timed out, killed)."""
  results = [r for r in records if r.get("kind") != "stage"]
  if not results:
    return ""
  if stage.render in ("train_step", "ablations", "xla_flags"):
    from bench import train_step
    try:
      args = train_step.parse_args(cmd[3:])
      if stage.render != "train_step":
        render = (train_step.ablation_table if stage.render == "ablations" else
                  train_step.xla_flags_table)
        return render(args, [r for r in results if "variant" in r], cmd[3:])
      return train_step.table(args, [r for r in results if "case" in r and "side" in r], cmd[3:])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - argparse exits; use the plain table
      print(f"bench.suite: {stage.name}: could not render its table: {e}", file=sys.stderr)
  return _generic_table(results)


def _markdown(stage: Stage, res: dict, cmd) -> str:
  """The stage's own report: its stdout without JSON lines; else a table from its results,
  plus any markdown it printed as progress on stderr."""
  own = "\n".join(l for l in res.get("stdout", "").splitlines() if _records(l) is None).strip()
  if own and res["status"] == "ok":
    return own
  parts = [own] if own else []
  table = _partial(stage, cmd, res.get("records", []))
  if table:
    parts.append(table)
  progress = [l for l in res.get("stderr", "").splitlines() if l.startswith(("|", "### "))]
  if progress and not table:
    parts.append("\n".join(progress))
  return "\n\n".join(parts)


def _note(stage_row: dict, res: dict) -> str:
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
        sections.append((stage.name, shown(cmd), _markdown(stage, res, cmd)))
      row["note"] = _note(row, res)
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
  if not args.out:
    parser().error("--out is required")

  def stop(signum, _frame):   # the run tool's timeout: end the stage's group, keep what finished
    for proc in list(_CURRENT):
      _kill(proc, grace=2.0)
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, stop)
  rows = run(stages, args.out, args.budget, smoke=args.smoke, work=args.work, argv=argv,
             part=args.part if not args.stages else "",
             log=lambda m: print(m, file=sys.stderr, flush=True))
  print("\n".join(f"{r['stage']}: {r['status']}" + (f" ({r['note']})" if r.get("note") else "")
                  for r in rows))


if __name__ == "__main__":
  main()
