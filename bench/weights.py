"""Random-looking benchmark weights, made on the device without a float32 copy of the model."""
from __future__ import annotations

import numpy as np


def hash_fill(abstract, seed: int = 0):
  """Pseudo-random weights for a tree of ShapeDtypeStructs, in each leaf's dtype (and sharding,
  where every leaf has one): a sine hash of the index, about U(-0.02, 0.02); norm scales 1. One
  elementwise program, so it compiles in a blink where threefry over 8B values would not."""
  import jax
  import jax.numpy as jnp
  leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)

  def leaf(i, path, x):
    if "scale" in str(path[-1]):
      return jnp.ones(x.shape, x.dtype)
    t = jax.lax.iota(jnp.float32, int(np.prod(x.shape))).reshape(x.shape)
    u = jnp.mod(jnp.sin(t * 12.9898 + 78.233 * (i + 1 + 1000 * seed)) * 43758.5453, 1.0)
    return ((u - 0.5) * 0.04).astype(x.dtype)
  shardings = [getattr(x, "sharding", None) for _, x in leaves]
  kw = ({"out_shardings": jax.tree_util.tree_unflatten(tree, shardings)}
        if all(s is not None for s in shardings) else {})
  return jax.jit(lambda: jax.tree_util.tree_unflatten(
      tree, [leaf(i, p, x) for i, (p, x) in enumerate(leaves)]), **kw)()


def random_train_state(plan, seed: int = 0) -> tuple:
  """(state, frozen) laid out as train.state.load makes them (train/state.py), with weights made
  on the device: trainable from seed + 1, frozen from seed + 2, AdamW state initialized."""
  import jax
  import jax.numpy as jnp
  from train.plan import abstract_state, rng_data
  state_abs, frozen_abs = abstract_state(plan)
  trainable = hash_fill(state_abs["trainable"], seed + 1)
  put = lambda x: jax.device_put(x, plan.state_shardings["step"])
  state = {"step": put(jnp.int32(0)), "rng": put(rng_data(seed, plan.prng_impl)),
           "trainable": trainable,
           "opt": jax.jit(plan.tx.init, out_shardings=plan.opt_shardings)(trainable),
           "nonfinite": put(jnp.int32(0)), "skipped_steps": put(jnp.int32(0))}
  return state, hash_fill(frozen_abs, seed + 2)
