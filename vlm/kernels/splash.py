"""JAX's TPU splash-attention kernel behind the signature of `flash_attention`.

Splash takes one sample [H, S, D] with the softmax scale already applied to q, a static (lazy)
mask object and optional segment ids. This wrapper scales q, pads S to the block size (padding gets
its own segment id so no real token sees it), groups query heads by kv head for GQA (the MQA kernel
per kv head: K/V are never repeated) and vmaps over batch and kv heads. Off TPU it runs in Pallas
TPU interpret mode (slow; for tests).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _kernel(seq: int, group: int, causal: bool, block: int, interpret: bool):
  """One MQA splash kernel (built at trace time; it holds jnp arrays, so it is not cached)."""
  shape = (seq, seq)
  mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sa.make_splash_mqa_single_device(sa.MultiHeadMask([mask] * group), block_sizes=sizes,
                                          interpret=interpret)


def splash_attention(q, k, v, segment_ids=None, causal: bool = True,
                     sm_scale: Optional[float] = None, interpret: bool = False,
                     block: int = 128):
  """q [B, S, Hq, D], k/v [B, S, Hkv, D], segment_ids int32 [B, S] -> [B, S, Hq, D]."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != d or hq % hkv:
    raise ValueError(f"splash_attention: bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
  group = hq // hkv
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  s_pad = _round_up(s, block)
  if segment_ids is None:
    segment_ids = jnp.zeros((b, s), jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  if s_pad != s:
    # One fresh id for the tail: padded keys stay invisible, padded rows are never empty.
    pad_id = jnp.max(segment_ids, axis=1, keepdims=True) + 1
    segment_ids = jnp.concatenate(
        [segment_ids, jnp.broadcast_to(pad_id, (b, s_pad - s))], axis=1)
  pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
  # [B, S, Hkv*G, D] -> [B, Hkv, G, S, D]; k/v -> [B, Hkv, S, D].
  qg = jnp.pad(q * jnp.asarray(sm_scale, q.dtype), pad).reshape(b, s_pad, hkv, group, d)
  qg = qg.transpose(0, 2, 3, 1, 4)
  kt = jnp.pad(k, pad).transpose(0, 2, 1, 3)
  vt = jnp.pad(v, pad).transpose(0, 2, 1, 3)
  kernel = _kernel(s_pad, group, causal, block, interpret)

  def one(qh, kh, vh, seg):
    return kernel(qh, kh, vh, segment_ids=sa.SegmentIds(q=seg, kv=seg))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))       # over kv heads
  out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kt, vt, segment_ids)  # over batch
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, s_pad, hq, d)
  return out[:, :s].astype(q.dtype)
