"""Named XLA:GPU flag sets for A/B runs (`--xla-flags` of bench.train_step and bench.generate).

XLA reads XLA_FLAGS once, when the backend starts, so every set runs in its own process; JAX's
persistent compilation cache hashes XLA_FLAGS into its key, so no set reuses another's program.
An unknown flag aborts that process: it becomes the set's table note, the other sets still run.
None of these is on by default in this project: a set moves into train/launch only with a
measured win recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import os

SETS = {
    "base": "",
    # Slices of the scanned [layers, ...] weight stacks feed cuBLAS in place instead of being
    # copied out first (off by default in XLA; the reason generation unstacks its layers).
    "dynamic_slice_fusion": "--xla_gpu_enable_dynamic_slice_fusion=true",
    # cuBLAS for every gemm, no Triton gemm fusions (MaxText's and Paxml's GPU recipes set it).
    "cublas_gemms": "--xla_gpu_enable_triton_gemm=false",
    # The scheduler that overlaps async work (copies, collectives) with compute.
    "latency_hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Unrolls the layer loop by two so the next layer's slices/copies overlap this layer's compute.
    "while_double_buffer": "--xla_gpu_enable_while_loop_double_buffering=true",
    # No CUDA graphs: what command buffers save in launch overhead.
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
}


def parse(spec: str) -> tuple[str, str]:
  """'cublas_gemms' -> its flags; 'NAME=--flag=v --flag2=w' -> a set of one's own."""
  if spec in SETS:
    return spec, SETS[spec]
  name, sep, flags = spec.partition("=")
  if not sep or not name or not flags.strip().startswith("--"):
    raise ValueError(f"XLA flag set {spec!r}: one of {sorted(SETS)} or NAME=--xla_flag=value ...")
  return name, flags.strip()


def environ(flags: str, base=None) -> dict:
  """The environment for a child run with `flags` appended to any XLA_FLAGS already set."""
  env = dict(os.environ if base is None else base)
  env["XLA_FLAGS"] = " ".join(x for x in (env.get("XLA_FLAGS", ""), flags) if x).strip()
  return env
