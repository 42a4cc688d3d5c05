"""Our side of bench.train_step: train.step.make_train_step as train.main builds it, compiled ahead
of time on random device-made weights and a device-resident batch, timed, optionally profiled."""
from __future__ import annotations

import dataclasses
import os
import time

from bench.env import device
from bench.step_cases import CASES, arch, batch, timed


def _train_config(args, case, cfg, total):
  from configs import common
  c = common.base()
  arch_dict = cfg.to_dict()
  c.model.update(init="scratch", arch=arch_dict, dtype=args.dtype,
                 frozen_dtype=getattr(args, "frozen_dtype", None) or args.dtype,
                 remat=args.remat, attention=args.attention, loss_chunk=args.loss_chunk)
  if case in ("lora", "llm"):
    common.lora(c, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
  else:
    c.trainable = (r"^connector/",)
  c.optim.update(lr=2e-4, warmup_ratio=0.0, grad_accum=1)
  c.mesh.update(shape=(1, 1, 1), num_devices=1)
  c.train.update(steps=total, prng_impl=getattr(args, "prng_impl", "threefry2x32"))
  return c


def _random(abstract, seed):
  """Weights in each leaf's dtype and sharding, made on the device (bench/weights.py)."""
  from bench.weights import hash_fill
  return hash_fill(abstract, seed)


def _peak_jax():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class Prepared:
  """Our step before any weights exist: a jitted fn, its abstract arguments, and how to make the
  real ones (`make() -> args`). carry: the first argument is a train state, donated each step."""
  fn: object
  abstract: tuple
  make: object
  carry: bool


def prepare(args, case) -> Prepared:
  import jax
  import jax.numpy as jnp
  from train import plan as plan_lib
  from train.step import make_train_step
  from vlm import tiler
  from vlm.model import normalize_pixels
  from vlm.sharding import batch_shardings
  cfg = arch(args, case)
  total = args.warmup + args.steps
  c = _train_config(args, case, cfg, total)
  mesh = plan_lib.mesh_for(c)
  p = plan_lib.plan(c, mesh, total)
  state_abs, frozen_abs = plan_lib.abstract_state(p)
  host = batch(args, cfg, case)
  sh = batch_shardings(mesh, host)
  batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in host.items()}
  put_batch = lambda: {k: jax.device_put(v, sh[k]) for k, v in host.items()}
  if case == "vision":
    v = p.config.vision
    dtype = jnp.dtype(args.dtype)

    def s2(m, px):
      x = normalize_pixels(px, v.mean, v.std).reshape((-1,) + px.shape[2:])
      return tiler.s2_features(lambda t: m.vision(t.astype(dtype), True), x, p.config.tiler.scales,
                               v.image_size, v.grid)
    fn = jax.jit(lambda prm, px: p.model.apply({"params": prm}, px, method=s2))
    tower = {"vision": frozen_abs["vision"]}
    return Prepared(fn, (tower, batch_abs["pixel_values"]),
                     lambda: (_random(tower, 2), put_batch()["pixel_values"]), carry=False)

  def make():
    from bench.weights import random_train_state
    return (*random_train_state(p), put_batch())
  step = make_train_step(p.model, p.tx, mesh=mesh, state_shardings=p.state_shardings,
                         frozen_shardings=p.frozen_shardings, batch_shardings=sh,
                         loss_chunk=c.model.loss_chunk, rules=p.rules)
  return Prepared(step, (state_abs, frozen_abs, batch_abs), make, carry=True)


def compile_step(prep: Prepared):
  """(compiled step, seconds to lower + compile it)."""
  t = time.perf_counter()
  compiled = prep.fn.lower(*prep.abstract).compile()
  return compiled, time.perf_counter() - t


def _memory(compiled) -> dict:
  """XLA's static memory analysis of a compiled step (bytes), where the backend gives one."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if m is None:
    return {}
  keys = {"compiled_args": "argument_size_in_bytes", "compiled_out": "output_size_in_bytes",
          "compiled_alias": "alias_size_in_bytes", "compiled_temp": "temp_size_in_bytes",
          "compiled_peak": "peak_memory_in_bytes"}
  return {k: int(getattr(m, a)) for k, a in keys.items() if getattr(m, a, None) is not None}


def run_prepared(args, prep: Prepared, compiled, compile_s) -> dict:
  """Time a compiled step; `_again` (popped by `measure`) runs one more step for the profiler."""
  import jax
  sync = jax.block_until_ready
  fixed = prep.make()
  metrics = {}
  if prep.carry:
    def one(st):
      st, m = compiled(st, *fixed[1:])
      metrics.update(m)
      return st
    first, dt, carry = timed(one, fixed[0], args.warmup, args.steps, sync)
  else:
    one = lambda _: compiled(*fixed)
    first, dt, carry = timed(one, None, args.warmup, args.steps, sync)
  box = [carry]

  def again():
    box[0] = one(box[0])
    return box[0]
  return {"first_s": compile_s + first, "compile_s": compile_s, "step_s": dt,
          "peak": _peak_jax(), "loss": float(metrics["loss"]) if metrics else None,
          **_memory(compiled), "device": device(), "_again": again}


def run_ours(args, case) -> dict:
  import jax
  if not args.smoke and jax.default_backend() != "gpu":
    raise RuntimeError("our side needs jax with a GPU (use --smoke on CPU)")
  prep = prepare(args, case)
  return run_prepared(args, prep, *compile_step(prep))


def profile_steps(args, case, again, step_s) -> dict:
  """Kernel summary of 2 traced steps (bench/profile.py); a profiler failure becomes a note."""
  from bench import profile
  try:
    s = profile.trace_steps(again, 2, os.path.join(args.profile, case), step_s=step_s,
                            title=f"profile: {CASES[case]}, ours, {args.warmup + args.steps} "
                                  "steps in; 2 traced steps")
  except Exception as e:  # noqa: BLE001 - the timing stands without the profile
    return {"note": f"{type(e).__name__}: {str(e).strip()[:160]}"}
  return {k: s[k] for k in ("text", "busy_pct", "kernel_ms", "busy_ms", "step_ms",
                            "traced_step_ms", "categories", "trace")}
