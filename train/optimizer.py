"""AdamW with warmup + cosine by ratio, a weight-decay mask, per-group learning rates and
global-norm clipping, matching torch's AdamW as HF Trainer runs it (decoupled decay scaled by the
group's lr, bias-corrected moments, eps outside the square root) and HF's
`get_cosine_schedule_with_warmup` (linear warm-up from 0 over ceil(ratio * steps), then a half
cosine to `min_lr_ratio * lr`).

Per-group rates (LLaVA's `mm_projector_lr`) are one schedule scaled per parameter by
group_lr / lr, so every group shares the warm-up and decay shape as torch param groups do.
"""
from __future__ import annotations

import math
import re

import jax
import optax
from flax.traverse_util import flatten_dict, unflatten_dict


def schedule(optim, total_steps: int):
  """lr(step) for the base group."""
  total = max(int(total_steps), 1)
  warmup = math.ceil(optim.warmup_ratio * total)
  end = optim.lr * optim.get("min_lr_ratio", 0.0)
  if optim.schedule == "cosine":
    if warmup >= total:
      return optax.linear_schedule(0.0, optim.lr, warmup)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, total, end)
  if optim.schedule == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(warmup, 1)),
                                 optax.linear_schedule(optim.lr, end, max(total - warmup, 1))],
                                [warmup])
  if optim.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(warmup, 1)),
                                 optax.constant_schedule(optim.lr)], [warmup])
  raise ValueError(f"optim.schedule must be cosine | linear | constant, got {optim.schedule!r}")


def _path_tree(params, fn):
  return unflatten_dict({k: fn("/".join(k)) for k in flatten_dict(params)})


def lr_scales(optim, params):
  """Per-parameter multiplier of the base lr: the first group whose pattern matches wins."""
  groups = [(re.compile(g.pattern), g.lr / optim.lr) for g in (optim.groups or {}).values()]

  def scale(path):
    for reg, s in groups:
      if reg.search(path):
        return s
    return 1.0
  return _path_tree(params, scale)


def decay_mask(optim, params):
  """True where weight decay applies: everything but the `no_decay` patterns (biases, norms)."""
  regs = [re.compile(p) for p in optim.no_decay]
  return _path_tree(params, lambda path: not any(r.search(path) for r in regs))


def make(optim, total_steps: int, params) -> tuple:
  """(optax transformation, base lr schedule) for a trainable parameter tree (or its shapes)."""
  sched = schedule(optim, total_steps)
  parts = []
  if optim.clip_norm:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(optax.scale_by_adam(optim.b1, optim.b2, optim.eps))
  if optim.weight_decay:
    parts.append(optax.add_decayed_weights(optim.weight_decay, decay_mask(optim, params)))
  parts.append(optax.scale_by_learning_rate(sched))
  scales = lr_scales(optim, params)
  if any(s != 1.0 for s in jax.tree_util.tree_leaves(scales)):
    parts.append(optax.stateless(
        lambda updates, _: jax.tree_util.tree_map(lambda u, s: u * s, updates, scales)))
  return optax.chain(*parts), sched

