"""A persistent XLA compilation cache for the command-line tools, on unless turned off.

Each `serve.chat` question, `evaluation.vqa run` and `train.main` start compiles the same programs
again: for Llama-3-8B a prefill and a decode program per prompt bucket, or the training step, with
gemm autotuning on a GPU (tens of seconds each). With this cache a rerun on the same shapes loads
them instead. JAX keys every entry on the program, its compile options, the jax/XLA versions, the
devices and XLA_FLAGS, so an entry is never used for anything else; on a GPU the per-fusion
autotune results are kept beside them.

The directory: JAX_COMPILATION_CACHE_DIR if set (JAX's own variable), else MEDVLM_COMPILE_CACHE,
else $XDG_CACHE_HOME/medvlm-jax/xla (~/.cache/medvlm-jax/xla). MEDVLM_COMPILE_CACHE=off turns it
off. JAX caches only programs that took at least jax_persistent_cache_min_compile_time_secs (1 s
by default) to compile.
"""
from __future__ import annotations

import os

OFF = ("off", "0", "none", "false")


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "medvlm-jax", "xla")


def enable() -> str | None:
  """Point JAX's persistent compilation cache at the directory above; -> it, or None when off.
  Call before the first compile (JAX opens the cache then)."""
  import jax
  if jax.config.jax_compilation_cache_dir:   # JAX_COMPILATION_CACHE_DIR or the caller chose
    return jax.config.jax_compilation_cache_dir
  path = os.environ.get("MEDVLM_COMPILE_CACHE", "").strip() or default_dir()
  if path.lower() in OFF:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_compilation_cache_dir", path)
  return path
