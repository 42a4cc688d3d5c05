"""Vision-to-language connector: `linear` or `mlp{N}x_gelu` (LLaVA's projector family).

mlp2x_gelu is Linear(in -> d), GELU (exact erf, as torch.nn.GELU()), Linear(d -> d).
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm.lora import Dense


def depth(kind: str) -> int:
  if kind == "linear":
    return 1
  m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
  if not m:
    raise ValueError(f"unknown connector {kind!r} (linear | mlp{{N}}x_gelu)")
  return int(m.group(1))


class Connector(nn.Module):
  kind: str
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(depth(self.kind)):
      if i:
        x = nn.gelu(x, approximate=False)
      axes = ("vision_embed", "embed") if i == 0 else ("mlp", "embed")
      x = Dense(self.out_dim, axes, use_bias=True, dtype=self.dtype, name=f"fc{i}")(x)
    return x
