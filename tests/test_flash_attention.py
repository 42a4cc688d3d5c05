"""Pallas flash attention and the splash wrapper vs the XLA reference of vlm.attention (CPU, interpret).

Each case draws fresh random q, k, v and an output cotangent, and compares the output and the
grads (dq, dk, dv) of one jitted forward + backward. Small tiles (16-32) make even S ~ 100 span
several blocks, so the block-skipping loop bounds, the masked/unmasked loop split, tail padding and
the GQA loop of the dk/dv kernel are all exercised.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import attention
from vlm.kernels import flash_attention as fa
from vlm.kernels import splash

SMALL = fa.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                      block_k_dq=16)


def _packed_ids(b, s, rng):
  """Contiguous runs of random lengths (a packed row), ids increasing, as the data pipeline emits."""
  cuts = np.sort(rng.choice(np.arange(1, s), size=(b, 3), replace=False), axis=1)
  return jnp.asarray((np.arange(s)[None, None] >= cuts[:, :, None]).sum(1), jnp.int32)


def _inputs(seed, b, s, hq, hkv, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, s, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, s, hq, d), jnp.float32).astype(dtype)
  return q, k, v, do


def _fwd_bwd(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def _check(impl_fn, *, b, s, hq, hkv, d, causal, packed, dtype, seed):
  """impl_fn(q, k, v, segment_ids, causal) vs attend(impl='xla') in float32 on the same values."""
  rng = np.random.default_rng(seed)
  q, k, v, do = _inputs(seed, b, s, hq, hkv, d, dtype)
  seg = _packed_ids(b, s, rng) if packed else None
  got = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: impl_fn(q, k, v, seg, causal), *a))(
      q, k, v, do)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  want = jax.jit(lambda *a: _fwd_bwd(
      lambda q, k, v: attention.attend(q, k, v, causal=causal, segment_ids=seg, impl="xla"),
      *a))(*f32)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape and g.dtype == dtype, (name, g.shape, w.shape, g.dtype)
    g = np.asarray(g, np.float32)
    w = np.asarray(w)
    if dtype == jnp.float32:
      err = np.abs(g - w).max()
      assert err <= 1e-4, f"{name}: max abs error {err}"
    else:
      rel = np.linalg.norm(g - w) / np.linalg.norm(w)
      assert rel <= 2e-2, f"{name}: relative error {rel}"


def _pallas(blocks):
  def fn(q, k, v, seg, causal):
    return fa.flash_attention(q, k, v, segment_ids=seg, causal=causal, interpret=True,
                              block_sizes=blocks)
  return fn


def _splash(q, k, v, seg, causal):
  return splash.splash_attention(q, k, v, segment_ids=seg, causal=causal, interpret=True)


# (b, s, hq, hkv, d, causal, packed, dtype): every axis the acceptance asks for appears at least
# once in the default set; the slow set crosses them further.
CASES = [
    (1, 77, 4, 1, 80, False, False, jnp.float32),    # GQA 4:1, odd S, D=80 padded to 128
    (2, 100, 8, 1, 128, True, True, jnp.float32),    # GQA 8:1, packed, causal, tail
    (1, 90, 4, 2, 64, False, True, jnp.bfloat16),    # packed bidirectional, bf16
]
SLOW_CASES = [
    (1, 64, 2, 2, 64, True, False, jnp.float32),
    (1, 130, 8, 1, 64, False, False, jnp.bfloat16),
    (2, 45, 4, 1, 80, True, True, jnp.float32),
    (1, 96, 8, 2, 128, True, False, jnp.bfloat16),
    (1, 120, 2, 1, 80, False, True, jnp.bfloat16),
]


@pytest.mark.parametrize("b,s,hq,hkv,d,causal,packed,dtype", CASES)
def test_pallas_matches_xla(b, s, hq, hkv, d, causal, packed, dtype):
  _check(_pallas(SMALL), b=b, s=s, hq=hq, hkv=hkv, d=d, causal=causal, packed=packed,
         dtype=dtype, seed=s * 7 + d)


@pytest.mark.slow
@pytest.mark.parametrize("b,s,hq,hkv,d,causal,packed,dtype", SLOW_CASES)
def test_pallas_matches_xla_more(b, s, hq, hkv, d, causal, packed, dtype):
  _check(_pallas(SMALL), b=b, s=s, hq=hq, hkv=hkv, d=d, causal=causal, packed=packed,
         dtype=dtype, seed=s * 11 + d)


def test_attend_pallas_default_blocks():
  """attend(impl='pallas') with the kernel's own float32 tiles (64/32, so S=130 spans several
  blocks and a padded tail); MHA, causal, no segment ids."""
  _check(lambda q, k, v, seg, causal: attention.attend(q, k, v, causal=causal, segment_ids=seg,
                                                       impl="pallas"),
         b=1, s=130, hq=2, hkv=2, d=64, causal=True, packed=False, dtype=jnp.float32, seed=3)


def test_splash_matches_xla():
  _check(_splash, b=1, s=100, hq=4, hkv=2, d=64, causal=True, packed=True, dtype=jnp.float32,
         seed=5)


@pytest.mark.slow
def test_splash_matches_xla_bidirectional_bf16():
  _check(_splash, b=2, s=70, hq=8, hkv=1, d=128, causal=False, packed=False,
         dtype=jnp.bfloat16, seed=6)


def test_block_ranges_never_skip_a_shared_id():
  """Every block pair outside the computed [lo, hi) range shares no segment id, and for packed
  rows (contiguous runs) the range is tight: its end blocks do share an id."""
  rng = np.random.default_rng(0)
  for seg, packed in ((_packed_ids(3, 256, rng), True),
                      (jnp.asarray(rng.integers(0, 4, (2, 256)), jnp.int32), False)):
    for rows, cols in ((32, 16), (16, 64)):
      lo, hi = map(np.asarray, fa._block_ranges(seg, rows, cols))
      ids = np.asarray(seg)
      for b in range(ids.shape[0]):
        for i in range(ids.shape[1] // rows):
          r = set(ids[b, i * rows:(i + 1) * rows])
          share = [bool(r & set(ids[b, j * cols:(j + 1) * cols]))
                   for j in range(ids.shape[1] // cols)]
          assert not any(share[:lo[b, i]]) and not any(share[hi[b, i]:])
          assert not packed or (share[lo[b, i]] and share[hi[b, i] - 1])


@pytest.mark.parametrize("d,dtype", [(80, jnp.bfloat16), (128, jnp.float32)])
def test_lowers_to_triton(d, dtype):
  """The GPU path (default tiles) lowers to Triton IR: power-of-two tiles, supported ops.
  No GPU is needed to lower; PTX compilation and speed are checked by bench/attention.py."""
  q = jax.ShapeDtypeStruct((2, 1000, 8, d), dtype)
  kv = jax.ShapeDtypeStruct((2, 1000, 2, d), dtype)
  seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)
  for causal in (True, False):
    for packed in (True, False):
      def f(q, k, v, seg, do):
        return _fwd_bwd(lambda q, k, v: fa.flash_attention(
            q, k, v, segment_ids=seg if packed else None, causal=causal), q, k, v, do)
      text = jax.jit(f).trace(q, kv, kv, seg, q).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("xla.gpu.triton") == 3  # forward, dk/dv, dq


def test_bad_shapes_raise():
  q = jnp.zeros((1, 8, 6, 16))
  with pytest.raises(ValueError, match="multiple"):
    fa.flash_attention(q, jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 4, 16)), interpret=True)
  with pytest.raises(ValueError, match="segment_ids"):
    fa.flash_attention(q, q, q, segment_ids=jnp.zeros((1, 7), jnp.int32), interpret=True)


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_bench_smoke():
  """The benchmark script runs end to end (tiny shapes, interpret mode) and prints its table."""
  out = subprocess.run([sys.executable, "-m", "bench.attention", "--smoke"], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| pallas |" in out.stdout and "| xla |" in out.stdout and "packed" in out.stdout


def test_splash_lowers_to_mosaic():
  """The splash wrapper (padding, GQA grouping, D=80) lowers for TPU: 3 Mosaic kernels."""
  q = jax.ShapeDtypeStruct((2, 200, 8, 80), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 200, 2, 80), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)

  def f(q, k, v, seg, do):
    return _fwd_bwd(lambda q, k, v: splash.splash_attention(q, k, v, segment_ids=seg), q, k, v,
                    do)
  text = jax.jit(f).trace(q, kv, kv, seg, q).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3
