"""The programs `python -m train.aot` compiles: what train.main (and the server) would run on a
target, built by the same code (train.plan, train.step, serve.programs) over the target's
compile-only devices and abstract arguments (jax.ShapeDtypeStruct with shardings): nothing is
allocated, no data or tokenizer is read.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from train import plan as plan_lib
from train.batches import data_config
from train.metrics import Flops
from train.step import make_eval_step, make_train_step
from vlm.sharding import batch_shardings, make_mesh

SERVE_SLOTS = (1, 16)   # serve.chat's one slot and the server's default --slots
PLAN_STEPS = 1000       # the schedule's length changes no shape


@dataclasses.dataclass
class Program:
  name: str
  fn: Any          # a jitted function
  args: tuple      # its abstract arguments
  flops: float     # analytic model FLOPs of one call (train/metrics.py), 0 where not counted
  loops: int = 1   # grad-accumulation trips of the program (the step's micro-batches)


def mesh_of(config, devices):
  """config.mesh over the target's devices (num_devices: the first that many)."""
  n = int(config.mesh.num_devices or 0)
  return make_mesh(tuple(config.mesh.shape), list(devices)[:n] if n else list(devices))


def abstract_batch(dcfg, has_vision: bool, rows: int, mesh) -> dict:
  """A global batch as the pipeline ships it (data/packing.py) at its longest bucket."""
  t = dcfg.max_len
  shapes = {k: ((rows, t), jnp.int32) for k in ("input_ids", "labels", "positions", "segment_ids")}
  n_img = dcfg.images_per_row() if has_vision else 0
  if n_img:
    g = dcfg.geometry
    side = (g.image_size, g.image_size, 3)
    if g.tiler == "anyres":
      shapes["pixel_values"] = ((rows, n_img, g.max_tiles) + side, jnp.uint8)
      shapes["image_sizes"] = ((rows, n_img, 4), jnp.int32)
    else:
      shapes["pixel_values"] = ((rows, n_img) + side, jnp.uint8)
  sh = batch_shardings(mesh, {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()})
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sh[k]) for k, (s, d) in shapes.items()}


def training(config, devices) -> tuple:
  """(plan, [train step, held-out eval step]) as train.trainer builds them."""
  mesh = mesh_of(config, devices)
  p = plan_lib.plan(config, mesh, int(config.train.steps or PLAN_STEPS))
  dcfg = data_config(config, p.config, tokenizer=False)
  accum = int(config.optim.grad_accum)
  if dcfg.global_batch % accum:
    raise ValueError(f"data.global_batch {dcfg.global_batch} is not divisible by optim.grad_accum "
                     f"{accum}")
  state, frozen = plan_lib.abstract_state(p)
  vision = p.config.vision is not None
  batch = abstract_batch(dcfg, vision, dcfg.global_batch, mesh)
  sh = {k: v.sharding for k, v in batch.items()}
  flops = Flops(p.config, p.abstract, p.mask)
  n_img = dcfg.images_per_row() if vision else 0
  step = make_train_step(p.model, p.tx, mesh=mesh, state_shardings=p.state_shardings,
                         frozen_shardings=p.frozen_shardings, batch_shardings=sh,
                         grad_accum=accum, loss_chunk=config.model.loss_chunk, rules=p.rules)
  g = dcfg.global_batch
  out = [Program("train_step", step, (state, frozen, batch), flops.step(g, dcfg.max_len, g * n_img),
                 accum)]
  eg = int(config.eval.global_batch or g)
  ebatch = abstract_batch(dcfg, vision, eg, mesh)
  ev = make_eval_step(p.model, mesh=mesh, trainable_shardings=p.trainable_shardings,
                      frozen_shardings=p.frozen_shardings,
                      batch_shardings={k: v.sharding for k, v in ebatch.items()},
                      loss_chunk=config.model.loss_chunk, rules=p.rules)
  fwd = Flops(p.config, p.abstract, jax.tree_util.tree_map(lambda _: False, p.mask))
  out.append(Program("eval_step", ev, (state["trainable"], frozen, ebatch),
                     fwd.step(eg, dcfg.max_len, eg * n_img) / 3))
  tower = s2_tower(p, batch, frozen)
  return p, out + ([tower] if tower else [])


def s2_tower(p, batch, frozen):
  """The S2 vision tower alone over one global batch's images (bench.step_ours' vision case)."""
  from vlm import tiler
  from vlm.model import normalize_pixels
  if p.config.vision is None or p.config.tiler.kind != "s2" or "pixel_values" not in batch:
    return None
  v, dtype = p.config.vision, p.model.runtime.dtype

  def s2(m, px):
    x = normalize_pixels(px, v.mean, v.std).reshape((-1,) + px.shape[2:])
    return tiler.s2_features(lambda t: m.vision(t.astype(dtype), True), x, p.config.tiler.scales,
                             v.image_size, v.grid)
  fn = jax.jit(lambda prm, px: p.model.apply({"params": prm}, px, method=s2))
  tower = {"vision": frozen["vision"]} if "vision" in frozen else None
  if tower is None:
    return None
  return Program("s2_tower", fn, (tower, batch["pixel_values"]), 0.0)


def serving_programs(p, devices, platform: str, slots=SERVE_SLOTS) -> list:
  """The serving engine's programs (serve/programs.py: image encode, each prefill chunk, insert,
  generate) for `python -m serve --dtype bfloat16 --slots N` at each N, every slot holding the
  model's whole context (no --kv-cache), on one device.

  The layout and the weights' layer layout are the server's own (serve.generate: per-layer
  weights except on TPUs, `chunks_for` the context), so what compiles here is what it runs."""
  from serve import generate as gen
  from serve import programs as engine_programs
  from vlm.model import unstack_layers
  dev = SingleDeviceSharding(list(devices)[0])
  scan = p.model.runtime.scan_layers and platform == "tpu"
  runtime = p.model.runtime.replace(dtype="bfloat16", scan_layers=scan)
  on_dev = lambda tree, dtype=None: jax.tree.map(   # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=dev)
      if isinstance(x, jax.ShapeDtypeStruct) else x, tree)
  params = on_dev(p.abstract, jnp.bfloat16)
  if not scan:
    params = on_dev(jax.eval_shape(unstack_layers, params))
  context = p.config.llm.max_positions
  out = []
  for n in slots:
    layout = engine_programs.Layout(n, context, gen.chunks_for(context), cache_dtype="bfloat16")
    progs = engine_programs.programs(p.config, runtime, None, (), layout)
    for name, args in progs.abstract_args(params).items():
      out.append(Program(f"serve_{name.replace('/', '')}_x{n}", progs.jit[name.split("/")[0]],
                         on_dev(args), 0.0))
  return out
