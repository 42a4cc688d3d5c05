"""Training-step speed on one GPU: this project's jitted train step vs the PyTorch LLaVA stack.

On one H100 (each case and side in its own process; roughly 8-10 minutes for all four cases, so
a short device session may run two calls: `--cases llm vision`, then `--cases lora stage1`):

  python -m bench.train_step --cases lora llm stage1 vision --steps 5 --warmup 2

  python -m bench.train_step --smoke          # tiny shapes on CPU, both sides: checks the script
  python -m bench.train_step --cases llm --side ours --layers 4 \
      --ablate base remat=none loss_chunk=0 attention=xla frozen_dtype=float32   # ablations
  python -m bench.train_step --cases llm --profile /tmp/prof   # + a kernel summary of our step

Cases, all on the Llama3-Med shape (`vlm.preset("llama3_med")`: S2 DFN5B ViT-H/14-378 at
378/756/1134 = 14 tiles per image, mlp2x_gelu connector, Llama-3-8B), micro-batch 8, sequence
2048, one image per row (BOS, 729 image positions, text):
  lora    (a) stage-2 LoRA step: tower frozen, connector + LoRA r=128 alpha=256 on
              q,k,v,o,gate,up,down train
  llm     (b) the LLM alone with the same LoRA (text only)
  stage1  (c) stage-1 step: only the connector trains, gradients flow through the frozen LLM
  vision  (d) the frozen S2 tower alone (forward, images/s)

Ours is train.step.make_train_step as train.main builds it (train.plan.plan: trainable float32
masters + AdamW state, frozen weights bf16, loss over trained tokens, vocabulary-chunked loss,
remat / attention from the flags), on random weights made on the device and a device-resident
batch. The reference is what the papers' code runs: HF LlamaForCausalLM (+ peft LoRA) and
CLIPVisionModel, SDPA, non-reentrant gradient checkpointing, bf16 frozen weights with float32
trainable weights under torch.autocast(bfloat16), torch AdamW + grad-norm clipping; the tower runs
under no_grad with LLaVA's S2 wrapper (one tower call per scale, hidden_states[select_layer]).

FLOPs (the same count for both sides, so TFLOP/s ratio = speed ratio): 6 N per LLM token, N = the
decoder's matmul parameters incl. LoRA adapters + the LM head (embedding lookup and attention scores
not counted; frozen weights need no weight gradient, the 6N convention counts it anyway);
6 N_connector per image feature; 2 N_vit per tower token for the frozen tower forward, N_vit = the
layers that run up to select_layer + patch embedding, 730 tokens x 14 tiles per image.
MFU = TFLOP/s / --peak-tflops (989: H100 SXM bf16 dense). Peak memory is the process's peak device
allocation (JAX memory_stats / torch.cuda.max_memory_allocated), init included. Our step is compiled
ahead of time, so its compile seconds and XLA's memory analysis are reported beside the timing.

Ablations (`--ablate`, ours only): each VARIANT (`base`, or `key=value[,key=value]` over remat,
attention, loss_chunk, frozen_dtype) is its own compiled step in one process, all compiled
first (`--compile-threads` at once) and then timed one after another on the same weights and
batch; memory per variant is XLA's compiled memory analysis, since the process peak spans them
all. `--layers N` runs them at reduced depth (same widths) so that many fit in a short session.
`--profile DIR` traces 2 more steps of ours after the timing (bench/profile.py) and adds the kernel
summary to the result.

XLA flag A/B (`--xla-flags SET ...`, ours only, first case): each named set of bench/xla_flags.py
(or NAME=--xla_flag=value ...) runs the step in its own process with those XLA_FLAGS, a row each
against the first set:

  python -m bench.train_step --cases llm --side ours --layers 4 \
      --xla-flags base dynamic_slice_fusion cublas_gemms latency_hiding

Files: this one is the driver and the command line; bench/step_cases.py the cases, their batch
and FLOPs; bench/step_ours.py and bench/step_reference.py the two sides; bench/step_ablations.py
the --ablate variants; bench/step_tables.py the markdown tables.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench import xla_flags
from bench.step_ablations import run_ablations, variant
from bench.step_cases import CASES, SIDES, SMOKE_FLAGS, arch, error, work
from bench.step_ours import profile_steps, run_ours
from bench.step_reference import run_reference
from bench.step_tables import ablation_table, table, xla_flags_table


# --- driver --------------------------------------------------------------------------------------

def measure(args, case, side, emit=None) -> dict:
  """One case on one side; a failure (OOM, missing CUDA) becomes a note. With --profile, ours is
  traced after the timing; `emit` gets the timed result first, so a profiler crash or hang
  cannot lose it."""
  r = {"case": case, "side": side}
  try:
    r.update(work(args, arch(args, case), case))
    r.update((run_ours if side == "ours" else run_reference)(args, case))
    again = r.pop("_again", None)
    if args.profile and again is not None:
      if emit:
        emit(r)
      r["profile"] = profile_steps(args, case, again, r["step_s"])
  except Exception as e:  # noqa: BLE001 - a failed case is a table note, not a crash
    r.pop("_again", None)
    r["note"] = error(e)
  return r


def _last_json(text) -> dict | None:
  """The last stdout line that is a JSON object (a child may print an early result first)."""
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  for line in reversed((text or "").strip().splitlines()):
    try:
      obj = json.loads(line)
    except ValueError:
      continue
    if isinstance(obj, dict):
      return obj
  return None


def _child(args, argv, case, side, env=None) -> dict:
  """One case on one side in a fresh process: the frameworks never share device memory, and a
  peak is that case's alone. A result the child printed before it died or timed out is kept."""
  cmd = [sys.executable, "-m", "bench.train_step", *argv, "--cases", case, "--side", side,
         "--json"]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    out, err, ended = res.stdout, res.stderr, f"exit {res.returncode}"
  except subprocess.TimeoutExpired as e:
    res, out, err, ended = None, e.stdout, e.stderr, f"timed out after {args.timeout} s"
  r = _last_json(out)
  if res is not None and res.returncode == 0 and r is not None:
    return r
  if isinstance(err, bytes):
    err = err.decode(errors="replace")
  last = ((err or "").strip().splitlines() or ["?"])[-1][:120]
  if r is not None and "step_s" in r:
    r["note"] = (r.get("note", "") + f" {ended} after the timing: {last}").strip()
    return r
  return {"case": case, "side": side,
          "note": ended if res is None else f"{ended}: {last}"}

def run_xla_flags(args, argv, case, sets, emit=print) -> list:
  """Ours on `case` once per (name, XLA_FLAGS) of `sets`, each in its own process."""
  child_argv = _without(argv, "--xla-flags")
  rows = []
  for name, flags in sets:
    r = _child(args, child_argv, case, "ours", env=xla_flags.environ(flags))
    r.update(variant=name, xla_flags=flags)
    emit(r)
    rows.append(r)
  return rows


def _without(argv, option) -> list:
  """argv less `option` and the values after it."""
  out, dropping = [], False
  for a in argv:
    if a == option or a.startswith(option + "="):
      dropping = a == option
      continue
    if dropping and not a.startswith("-"):
      continue
    dropping = False
    out.append(a)
  return out


def parser():
  p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
  p.add_argument("--side", choices=("both",) + SIDES, default="both")
  p.add_argument("--steps", type=int, default=5, help="timed steps per case and side")
  p.add_argument("--warmup", type=int, default=2, help="steps before timing (the first compiles)")
  p.add_argument("--micro-batch", type=int, default=8, help="rows (= images) per step")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--preset", default="llama3_med")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype and frozen-weight storage (both sides)")
  p.add_argument("--remat", default="full", choices=("none", "full", "save_dots",
                                                     "save_attn_proj"), help="ours only")
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "pallas",
                                                         "splash"), help="ours only")
  p.add_argument("--loss-chunk", type=int, default=512,
                 help="positions per vocabulary projection in our loss (0: all at once)")
  p.add_argument("--lora-rank", type=int, default=128)
  p.add_argument("--lora-alpha", type=float, default=256.0)
  p.add_argument("--lora-dropout", type=float, default=0.05)
  p.add_argument("--prng-impl", default="threefry2x32", choices=("threefry2x32", "rbg"),
                 help="our dropout key's PRNG (train.prng_impl)")
  p.add_argument("--peak-tflops", type=float, default=989.0,
                 help="device peak for MFU (989: H100 SXM bf16 dense)")
  p.add_argument("--layers", type=int, default=0,
                 help="decoder layers (0: the preset's); fewer keeps the widths, cuts step time")
  p.add_argument("--frozen-dtype", default=None, choices=("bfloat16", "float32"),
                 help="storage of our frozen weights (default: --dtype); ours only")
  p.add_argument("--ablate", nargs="+", type=str, default=None, metavar="VARIANT",
                 help="ours only, first case: base or key=value[,key=value] over remat, "
                      "attention, loss_chunk, frozen_dtype; one process, a row each")
  p.add_argument("--xla-flags", nargs="+", default=None, metavar="SET",
                 help="ours only, first case: a process per XLA flag set (bench/xla_flags.py "
                      f"names: {', '.join(xla_flags.SETS)}; or NAME=--xla_flag=value ...)")
  p.add_argument("--compile-threads", type=int, default=1,
                 help="ablation variants compiled at once (all finish before any is timed)")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace 2 more steps of ours into DIR/<case> and summarize the kernels")
  p.add_argument("--timeout", type=int, default=400, help="seconds per case and side (GPU)")
  p.add_argument("--json", action="store_true", help="print one JSON result (child mode)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes on CPU, float32, 1 step, both sides in this process")
  return p


def parse_args(argv):
  p = parser()
  if p.parse_args(argv).smoke:   # tiny defaults in place of the parser's; given flags still win
    p.set_defaults(**SMOKE_FLAGS)
  return p.parse_args(argv)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  sides = SIDES if args.side == "both" else (args.side,)
  # each result as it comes: the JSON lines are the output (--json) or progress on stderr
  emit = ((lambda r: print(json.dumps(r), flush=True)) if args.json else
          (lambda r: print(json.dumps(r), file=sys.stderr, flush=True)))
  if args.xla_flags:
    try:   # a bad set fails before any work
      sets = [xla_flags.parse(spec) for spec in args.xla_flags]
    except ValueError as e:
      parser().error(str(e))
    rows = run_xla_flags(args, argv, args.cases[0], sets, emit)
    if not args.json:
      print(xla_flags_table(args, rows, argv))
    return
  if args.ablate:
    for text in args.ablate:   # fail on a bad variant before any work
      try:
        variant(text)
      except argparse.ArgumentTypeError as e:
        parser().error(str(e))
    try:
      rows = run_ablations(args, args.cases[0], emit)
    except Exception as e:  # noqa: BLE001 - e.g. no GPU: one note instead of a traceback
      rows = [{"case": args.cases[0], "side": "ours", "variant": "all",
               "note": error(e)}]
      emit(rows[0])
    if not args.json:
      print(ablation_table(args, rows, argv))
    return
  if args.json:
    print(json.dumps(measure(args, args.cases[0], sides[0], emit)))
    return
  rows = []
  for case in args.cases:
    for side in sides:
      r = measure(args, case, side) if args.smoke else _child(args, argv, case, side)
      rows.append(r)
      emit(r)
  print(table(args, rows, argv))


if __name__ == "__main__":
  main()
