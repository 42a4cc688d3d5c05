"""Dense layers with optional LoRA adapters, and merging adapters into their kernels.

A `Dense` with rank r > 0 adds `lora_a` [in, r] and `lora_b` [r, out] beside its `kernel` [in, out]
and computes x @ W + (dropout(x) @ A @ B) * alpha / r, as peft's LoRA Linear does; B starts at zero so
a fresh adapter leaves the model unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

Axes = tuple


def _kaiming_uniform_a5(key, shape, dtype=jnp.float32):
  """torch's default Linear init (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in));
  peft initializes lora_A this way."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
  """[in, out] kernel with logical axes; compute in `dtype`, params kept in their stored dtype."""
  features: int
  axes: Axes  # logical names of (in, out)
  use_bias: bool = False
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  kernel_init: Callable = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (d_in, self.features), jnp.float32)
    x = x.astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      a = self.param("lora_a", nn.with_logical_partitioning(_kaiming_uniform_a5, (self.axes[0], "lora")),
                     (d_in, self.lora_rank), jnp.float32)
      b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora", self.axes[1])),
                     (self.lora_rank, self.features), jnp.float32)
      h = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic) if self.lora_dropout else x
      h = jnp.einsum("...i,ir->...r", h, a.astype(self.dtype))
      y = y + jnp.einsum("...r,ro->...o", h, b.astype(self.dtype)) * (self.lora_alpha / self.lora_rank)
    return y


def lora_paths(params) -> list:
  """Paths (tuples) of every Dense that carries an adapter."""
  return [path[:-1] for path in flatten_dict(params) if path[-1] == "lora_a"]


def merge(params, scale: float):
  """Fold every adapter into its kernel (W + A B * scale) and drop the adapters. Works on scanned
  [layers, ...] stacks."""
  flat = flatten_dict(params)
  out = dict(flat)
  for path in lora_paths(params):
    a, b, w = out.pop(path + ("lora_a",)), out.pop(path + ("lora_b",)), flat[path + ("kernel",)]
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    out[path + ("kernel",)] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return unflatten_dict(out)
