"""Flash attention (forward + backward) as Pallas Triton kernels, with segment ids and GQA.

Layout q [B, S, Hq, D], k/v [B, S, Hkv, D] is kept end to end (no transposes). GQA: query head h
reads kv head h // (Hq // Hkv) through the BlockSpec index map, and the dk/dv kernel runs per kv
head and loops over its query heads, so K/V (and their grads) never exist per query head.

Algorithm (FlashAttention-2): online softmax in float32 in base 2 (exp2, scale * log2(e) folded
into the logits); the forward saves the base-2 logsumexp; the backward recomputes probabilities
per block in two kernels, dk/dv (grid over kv blocks, loop over q blocks) and dq (grid over q
blocks, loop over kv blocks), with delta = rowsum(o * do) computed by XLA. Rows that see no key
give zeros (as the XLA reference does).

Block skipping: loop bounds skip every fully masked block. Causal: kv blocks past the diagonal.
Segment ids: the wrapper computes, per block row, the range of blocks whose [min, max] id span
overlaps the row's span (exact for packed rows, where ids are contiguous runs; a safe superset for
any ids). Blocks that need no mask (strictly below the diagonal, no tail padding, no segment ids)
run a loop body without the mask arithmetic.

Shapes: any S (padded in the wrapper to a multiple of the largest block; padded keys are masked,
padded rows sliced off). Head dims that are not a power of two (Triton tiles must be), e.g. 80,
are zero-padded to the next power of two in the wrapper (80 -> 128: exact, costs 60% more MMA
work for D=80 only). bf16/f16 inputs use bf16/f16 MMAs with float32 accumulation; float32 inputs
use full-precision (IEEE, not TF32) dots.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # GPU-only module; absent or renamed is fine in interpret mode.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (powers of two, >= 16 on GPU) and Triton launch parameters per kernel.

  Defaults are the FlashAttention-2 Triton tutorial's Hopper choices for D=128; tune with
  bench/attention.py. The sequence is padded to a multiple of the largest block.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps: int = 8
  num_warps_bwd: int = 4
  num_stages: int = 3
  num_stages_bwd: int = 3

  def clamp(self, seq: int) -> "BlockSizes":
    """Shrinks blocks for short sequences (to the next power of two >= seq, at least 16)."""
    cap = max(16, pl.next_power_of_2(seq))
    names = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
    return dataclasses.replace(self, **{n: min(getattr(self, n), cap) for n in names})

  @classmethod
  def for_dtype(cls, dtype) -> "BlockSizes":
    """16-bit inputs: the defaults. float32 doubles the bytes per tile: halve the tiles and
    pipeline stages so the shared-memory footprint stays within an H100 SM (~227 KiB)."""
    if jnp.dtype(dtype).itemsize <= 2:
      return cls()
    return cls(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64, block_q_dq=64,
               block_k_dq=32, num_warps=4, num_stages=2, num_stages_bwd=2)

  @property
  def largest(self) -> int:
    return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv, self.block_q_dq,
               self.block_k_dq)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialize on (hashable: a custom_vjp nondiff argument)."""
  sm_scale: float
  causal: bool
  kv_len: int  # real sequence length; keys at or past it are padding
  blocks: BlockSizes
  interpret: bool


def _params(num_warps: int, num_stages: int):
  if plgpu is None:
    return None
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b with float32 accumulation; transposes are folded into the contraction (free on MMA)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _mask(st: _Static, q_start, k_start, bq: int, bk: int, q_seg=None, k_seg=None):
  """[bq, bk] visibility of keys k_start.. for queries q_start.. (causal, tail, segments)."""
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_idx = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = k_idx < st.kv_len
  if st.causal:
    mask = mask & (q_idx >= k_idx)
  if q_seg is not None:
    mask = mask & (q_seg[:, None] == k_seg[None, :])
  return mask


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), b)


def _kv_loop_bounds(st: _Static, qi, bq: int, bk: int, nk: int, rng_refs):
  """(lo, mid, hi): kv blocks [lo, mid) need no mask, [mid, hi) do, the rest are skipped."""
  if rng_refs is not None:
    lo, hi = rng_refs[0][...], rng_refs[1][...]
  else:
    lo, hi = jnp.int32(0), jnp.int32(nk)
  if st.causal:
    hi = jnp.minimum(hi, _cdiv((qi + 1) * bq, bk))
  if rng_refs is not None:
    return lo, lo, hi
  mid = jnp.int32(st.kv_len // bk)  # blocks free of tail padding
  if st.causal:
    mid = jnp.minimum(mid, lax.div(qi * bq + 1, bk))  # blocks wholly below the diagonal
  return lo, jnp.clip(mid, lo, hi), hi


def _fwd_kernel(*refs, st: _Static, has_seg: bool, nk: int):
  if has_seg:
    q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
    rng = (lo_ref, hi_ref)
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    rng = None
  bq, bk = st.blocks.block_q, st.blocks.block_k
  qi = pl.program_id(0)
  q = q_ref[...]
  q_seg = seg_ref[pl.ds(qi * bq, bq)] if has_seg else None
  scale = st.sm_scale * LOG2E

  def body(j, carry, masked):
    acc, m, l = carry
    ks = pl.multiple_of(j * bk, bk)
    s = _dot(q, k_ref[pl.ds(ks, bk), :], trans_b=True) * scale
    if masked:
      k_seg = seg_ref[pl.ds(ks, bk)] if has_seg else None
      s = jnp.where(_mask(st, qi * bq, ks, bq, bk, q_seg, k_seg), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    if masked:  # a row with nothing visible yet keeps m = -inf; avoid (-inf) - (-inf)
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_use = m_new
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    v = v_ref[pl.ds(ks, bk), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  lo, mid, hi = _kv_loop_bounds(st, qi, bq, bk, nk, rng)
  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # +inf for empty rows makes every recomputed probability exp2(s - lse) zero in the backward.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dkv_kernel(*refs, st: _Static, has_seg: bool, group: int, nq: int):
  if has_seg:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, lo_ref, hi_ref,
     dk_ref, dv_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
  kj = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_seg = seg_ref[pl.ds(kj * bk, bk)] if has_seg else None
  scale = st.sm_scale * LOG2E

  # q blocks: [lo, mid) need the mask (diagonal, segments, padded keys), [mid, hi) do not.
  lo = lax.div(kj * bk, bq) if st.causal else jnp.int32(0)
  if has_seg:
    lo, hi = jnp.maximum(lo, lo_ref[...]), hi_ref[...]
    mid = hi
  else:
    hi = jnp.int32(nq)
    mid = _cdiv((kj + 1) * bk - 1, bq) if st.causal else lo
    mid = jnp.where((kj + 1) * bk > st.kv_len, hi, mid)
    mid = jnp.clip(mid, lo, hi)

  def body(i, carry, g, masked):
    dk, dv = carry
    qs = pl.multiple_of(i * bq, bq)
    q = q_ref[pl.ds(qs, bq), g, :]
    do = do_ref[pl.ds(qs, bq), g, :]
    s = _dot(q, k, trans_b=True) * scale
    p = jnp.exp2(s - lse_ref[g, pl.ds(qs, bq)][:, None])
    if masked:
      q_seg = seg_ref[pl.ds(qs, bq)] if has_seg else None
      p = jnp.where(_mask(st, qs, kj * bk, bq, bk, q_seg, k_seg), p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta_ref[g, pl.ds(qs, bq)][:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  def head(g, carry):
    carry = lax.fori_loop(lo, mid, functools.partial(body, g=g, masked=True), carry)
    return lax.fori_loop(mid, hi, functools.partial(body, g=g, masked=False), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: _Static, has_seg: bool, nk: int):
  if has_seg:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, lo_ref, hi_ref, dq_ref = refs
    rng = (lo_ref, hi_ref)
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    rng = None
  bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
  qi = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_seg = seg_ref[pl.ds(qi * bq, bq)] if has_seg else None
  scale = st.sm_scale * LOG2E

  def body(j, dq, masked):
    ks = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(ks, bk), :]
    p = jnp.exp2(_dot(q, k, trans_b=True) * scale - lse)
    if masked:
      k_seg = seg_ref[pl.ds(ks, bk)] if has_seg else None
      p = jnp.where(_mask(st, qi * bq, ks, bq, bk, q_seg, k_seg), p, 0.0)
    ds = p * (_dot(do, v_ref[pl.ds(ks, bk), :], trans_b=True) - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  lo, mid, hi = _kv_loop_bounds(st, qi, bq, bk, nk, rng)
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(lo, mid, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(mid, hi, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _block_ranges(seg, rows: int, cols: int):
  """Per block of `rows` tokens, the [lo, hi) range of `cols`-blocks that can share a segment id.

  A column block is outside the range only if its id span [min, max] misses the row block's span.
  """
  b, s = seg.shape
  rmin = seg.reshape(b, s // rows, rows).min(-1)
  rmax = seg.reshape(b, s // rows, rows).max(-1)
  cmin = seg.reshape(b, s // cols, cols).min(-1)
  cmax = seg.reshape(b, s // cols, cols).max(-1)
  lo = jnp.argmax(cmax[:, None, :] >= rmin[:, :, None], axis=-1)
  hit = cmin[:, None, :] <= rmax[:, :, None]
  hi = s // cols - jnp.argmax(hit[:, :, ::-1], axis=-1)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _segment_specs(s: int) -> list:
  """BlockSpecs of a program's segment ids (the whole row) and of its block's two loop bounds
  (_block_ranges); every grid here is (block, batch, head)."""
  bounds = pl.BlockSpec((None, None), lambda blk, n, h: (n, blk))
  return [pl.BlockSpec((None, s), lambda blk, n, h: (n, 0)), bounds, bounds]


def _fwd_call(st: _Static, q, k, v, seg, ranges):
  b, s, hq, d = q.shape
  group = hq // k.shape[2]
  bq, nk = st.blocks.block_q, s // st.blocks.block_k
  has_seg = seg is not None
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0)),
      pl.BlockSpec((None, s, None, d), lambda i, n, h: (n, 0, h // group, 0)),
      pl.BlockSpec((None, s, None, d), lambda i, n, h: (n, 0, h // group, 0)),
  ]
  args = [q, k, v]
  if has_seg:
    in_specs += _segment_specs(s)
    args += [seg, *ranges["fwd"]]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, has_seg=has_seg, nk=nk),
      grid=(s // bq, b, hq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, s), jnp.float32)],
      compiler_params=_params(st.blocks.num_warps, st.blocks.num_stages),
      interpret=st.interpret,
      name="flash_fwd",
  )(*args)


def _bwd_call(st: _Static, q, k, v, seg, ranges, o, lse, do):
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  blk = st.blocks
  has_seg = seg is not None
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
  params = _params(blk.num_warps_bwd, blk.num_stages_bwd)

  # dk, dv: one program per (kv block, batch, kv head), looping over the group's query heads.
  bq, bk = blk.block_q_dkv, blk.block_k_dkv
  full_q = pl.BlockSpec((None, s, group, d), lambda j, n, h: (n, 0, h, 0))
  rows = pl.BlockSpec((None, group, s), lambda j, n, h: (n, h, 0))
  kv_blk = pl.BlockSpec((None, bk, None, d), lambda j, n, h: (n, j, h, 0))
  in_specs = [full_q, kv_blk, kv_blk, full_q, rows, rows]
  args = [q, k, v, do, lse, delta]
  if has_seg:
    in_specs += _segment_specs(s)
    args += [seg, *ranges["dkv"]]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, has_seg=has_seg, group=group, nq=s // bq),
      grid=(s // bk, b, hkv),
      in_specs=in_specs,
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=st.interpret,
      name="flash_bwd_dkv",
  )(*args)

  # dq: one program per (q block, batch, query head), looping over kv blocks.
  bq, bk = blk.block_q_dq, blk.block_k_dq
  q_blk = pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0))
  full_kv = pl.BlockSpec((None, s, None, d), lambda i, n, h: (n, 0, h // group, 0))
  row_blk = pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i))
  in_specs = [q_blk, full_kv, full_kv, q_blk, row_blk, row_blk]
  args = [q, k, v, do, lse, delta]
  if has_seg:
    in_specs += _segment_specs(s)
    args += [seg, *ranges["dq"]]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, has_seg=has_seg, nk=s // bk),
      grid=(s // bq, b, hq),
      in_specs=in_specs,
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=st.interpret,
      name="flash_bwd_dq",
  )(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, seg, ranges):
  return _fwd_call(st, q, k, v, seg, ranges)[0]


def _flash_fwd(st, q, k, v, seg, ranges):
  o, lse = _fwd_call(st, q, k, v, seg, ranges)
  return o, (q, k, v, seg, ranges, o, lse)


def _flash_bwd(st, res, do):
  q, k, v, seg, ranges, o, lse = res
  dq, dk, dv = _bwd_call(st, q, k, v, seg, ranges, o, lse, do)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, segment_ids=None, causal: bool = True,
                    sm_scale: Optional[float] = None, interpret: bool = False,
                    block_sizes: Optional[BlockSizes] = None):
  """q [B, S, Hq, D], k/v [B, S, Hkv, D], segment_ids int32 [B, S] -> [B, S, Hq, D].

  A query attends to keys of its own segment id (and, if causal, not after it). interpret=True
  runs the kernels in the Pallas interpreter (any backend; tests on CPU).
  """
  b, s, hq, d = q.shape
  if k.shape != v.shape or k.ndim != 4 or k.shape[:2] != (b, s) or k.shape[3] != d:
    raise ValueError(f"flash_attention: q {q.shape} needs k, v of shape [B, S, Hkv, D], "
                     f"got k {k.shape}, v {v.shape}")
  if hq % k.shape[2]:
    raise ValueError(f"flash_attention: {hq} query heads is not a multiple of {k.shape[2]} kv heads")
  if segment_ids is not None and segment_ids.shape != (b, s):
    raise ValueError(f"flash_attention: segment_ids {segment_ids.shape} must be {(b, s)}")
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  blocks = (block_sizes or BlockSizes.for_dtype(q.dtype)).clamp(s)
  s_pad = -(-s // blocks.largest) * blocks.largest
  d_pad = max(16, pl.next_power_of_2(d))
  pad = ((0, 0), (0, s_pad - s), (0, 0), (0, d_pad - d))
  qp, kp, vp = (jnp.pad(x, pad) if pad != ((0, 0),) * 4 else x for x in (q, k, v))
  ranges = None
  if segment_ids is not None:
    # Edge padding keeps the id runs contiguous, so the tail adds no extra blocks.
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s)), mode="edge")
    ranges = {"fwd": _block_ranges(segment_ids, blocks.block_q, blocks.block_k),
              "dq": _block_ranges(segment_ids, blocks.block_q_dq, blocks.block_k_dq),
              "dkv": _block_ranges(segment_ids, blocks.block_k_dkv, blocks.block_q_dkv)}
  st = _Static(sm_scale=sm_scale, causal=bool(causal), kv_len=s, blocks=blocks,
               interpret=bool(interpret))
  out = _flash(st, qp, kp, vp, segment_ids, ranges)
  return out[:, :s, :, :d]
