"""bench.suite's stages: one benchmark command each, in priority order, with its a-priori
estimate and timeout.

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

import dataclasses
import shlex
import sys


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


def command(stage: Stage, smoke: bool, work: str) -> list:
  args = stage.smoke_args if smoke else stage.args
  return [sys.executable, "-m"] + [a.replace("{work}", work) for a in args]


def shown(cmd) -> str:
  """The command as a person types it (python, not this interpreter's path)."""
  return shlex.join(["python"] + list(cmd[1:]))
