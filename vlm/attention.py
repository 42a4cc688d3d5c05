"""One attention entry point for every layer of the project.

`attend(q, k, v, ...)` takes q [B, T, Hq, D] and k, v [B, S, Hkv, D] (Hq a multiple of Hkv: GQA
without repeating K/V per query head) and returns [B, T, Hq, D]. Masks are built from indices and
segment ids, never passed as dense [T, S] tensors, so the fused kernels can skip masked blocks.

Implementations:
- 'xla': plain einsum + float32 softmax; runs everywhere, the reference for the others.
- 'cudnn': jax.nn.dot_product_attention's cuDNN flash kernel (GPU only).
- 'pallas': this project's Pallas flash kernel (vlm/kernels/flash_attention.py); interpret mode on CPU.
- 'splash': JAX's TPU splash-attention kernel behind the same signature.
- 'auto': the fastest measured path for the backend (see `_auto`).

The backend is the one a program is compiled for: `jax.default_backend()` unless `compiling_for`
names another (train.aot compiles for a GPU or TPU from a CPU host).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("xla", "cudnn", "pallas", "splash", "auto")
_TARGET: list = []   # the platform programs are traced for, innermost last


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Trace attention for `platform` ('gpu', 'tpu', 'cpu'): `auto` and the kernels' interpret mode
  follow it instead of the host's backend."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def platform() -> str:
  """The backend attention is traced for."""
  return _TARGET[-1] if _TARGET else jax.default_backend()


def attention_mask(t: int, s: int, *, causal: bool, segment_ids=None,
                   sliding_window: Optional[int] = None):
  """Boolean [B or 1, T, S] mask: query i sees key j when allowed."""
  qi = jnp.arange(t)[:, None]
  kj = jnp.arange(s)[None, :]
  mask = jnp.ones((t, s), bool)
  if causal:
    mask = kj <= qi
  if sliding_window is not None:
    mask = mask & (qi - kj < sliding_window)
  mask = mask[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def _xla(q, k, v, mask, scale):
  return _xla_parts(q, ((k, v, mask, "bskd"),), scale)


def _xla_parts(q, parts, scale):
  """Softmax attention over the union of key sets [(k, v, mask [B|1, T, S], layout), ...] without
  concatenating K/V (a decode step reads the cache where it lies). layout 'bskd': k, v
  [B, S, Hkv, D]; 'bksd': [B, Hkv, S, D] (the KV cache's heads-major layout)."""
  b, t, hq, d = q.shape
  hkv = parts[0][0].shape[2 if parts[0][3] == "bskd" else 1]
  q = q.reshape(b, t, hkv, hq // hkv, d)
  logits = [jnp.where(m[:, None, None], jnp.einsum(f"btkgd,{lay}->bkgts", q, k,
                                                   preferred_element_type=jnp.float32) * scale,
                      jnp.finfo(jnp.float32).min) for k, _, m, lay in parts]
  sizes = [x.shape[-1] for x in logits]
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  # A row with no visible key (pure padding) gets zeros, not a uniform average of garbage.
  seen = jnp.stack([jnp.broadcast_to(m.any(-1), (b, t)) for _, _, m, _ in parts]).any(0)
  probs = jnp.where(seen[:, None, None, :, None], probs, 0.0)
  probs = jnp.split(probs, np.cumsum(sizes)[:-1], axis=-1)
  out = sum(jnp.einsum(f"bkgts,{lay}->btkgd", p.astype(v.dtype), v)
            for p, (_, v, _, lay) in zip(probs, parts))
  return out.reshape(b, t, hq, d)


def _cudnn(q, k, v, *, causal, segment_ids, scale):
  if segment_ids is not None:
    # cuDNN takes no segment ids through this API: use the dense mask (correct, slower; the
    # Pallas kernel is the packed-sequence path).
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, segment_ids=segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                        implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                      implementation="cudnn")


def _cudnn_takes(q, k, v, causal, segment_ids, scale) -> bool:
  """Whether jax's cuDNN attention accepts these inputs forward and backward (it checks at trace
  time, the backward's conditions only when the gradient is traced: CLIP-L/336's 577 tokens; it
  takes no float32)."""
  def fwd_bwd(q, k, v, seg):
    out, back = jax.vjp(lambda *a: _cudnn(*a, causal=causal, segment_ids=seg, scale=scale),
                        q, k, v)
    return back(out)
  abstract = [None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)
              for x in (q, k, v, segment_ids)]
  try:
    jax.eval_shape(fwd_bwd, *abstract)
  except (NotImplementedError, ValueError):   # a length, head dim or dtype (float32) it refuses
    return False
  return True


def _splash(q, k, v, *, segment_ids, causal, scale):
  """Splash per device: a Mosaic kernel is not partitioned by XLA, so on a mesh (the enclosing
  vlm.sharding.activation_sharding) it runs under shard_map over the batch and head axes the
  rules give the activations, each device seeing whole sequences."""
  from jax.sharding import PartitionSpec as P

  from vlm import sharding
  from vlm.kernels import splash
  run = lambda q, k, v, seg: splash.splash_attention(
      q, k, v, segment_ids=seg, causal=causal, sm_scale=scale, interpret=platform() != "tpu")
  active = sharding.active()
  if active is None or active[0].size == 1:
    return run(q, k, v, segment_ids)
  mesh, rules = active
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  qs = sharding.spec_for(("activation_batch", None, "activation_heads", None), q.shape, mesh, rules)
  ks = sharding.spec_for(("activation_batch", None, "activation_kv_heads", None), k.shape, mesh,
                         rules)
  heads = qs[2] if qs[2] == ks[2] else None   # query groups stay with their kv head
  qs, ks = P(qs[0], None, heads, None), P(qs[0], None, heads, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs,
                       check_vma=False)(q, k, v, segment_ids)


def _auto(backend: str) -> str:
  # GPU: cuDNN until the Pallas kernel is measured faster by `python -m bench.attention` on an
  # H100 (docs/benchmarks.md). No GPU measurement of the kernel exists yet (2026-11-28); the
  # packed case (segment ids) is where it should win first: cuDNN then needs a dense mask.
  if backend == "gpu":
    return "cudnn"
  if backend == "tpu":
    return "splash"
  return "xla"


def attend(q, k, v, *, causal: bool = True, segment_ids=None,
           sliding_window: Optional[int] = None, scale: Optional[float] = None,
           impl: str = "xla"):
  """Scaled dot-product attention; see the module docstring for shapes and implementations.

  segment_ids [B, T] int32: a query sees only keys with its own id (packing; padding has its own
  id). Queries and keys are the same tokens (T == S); KV-cache decode uses `attend_cached`.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} not in {IMPLS}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  t, s = q.shape[1], k.shape[1]
  fused_ok = t == s and sliding_window is None
  auto = impl == "auto"
  if auto:
    impl = _auto(platform())
  if impl != "xla" and not fused_ok:
    impl = "xla"  # sliding windows take the reference path
  if impl == "cudnn" and auto and not _cudnn_takes(q, k, v, causal, segment_ids, scale):
    impl = "xla"   # a shape cuDNN's kernel refuses: `auto` takes the reference path there
  if impl == "cudnn":
    return _cudnn(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale)
  if impl == "pallas":
    from vlm.kernels import flash_attention
    return flash_attention.flash_attention(
        q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=scale,
        interpret=platform() != "gpu")  # Triton kernels: GPU only, else interpreted
  if impl == "splash":
    return _splash(q, k, v, segment_ids=segment_ids, causal=causal, scale=scale)
  mask = attention_mask(t, s, causal=causal, segment_ids=segment_ids,
                        sliding_window=sliding_window)
  return _xla(q, k, v, mask, scale)


def attend_cached(q, k, v, k_cache, v_cache, *, index, segment_ids, cache_segment_ids,
                  sliding_window: Optional[int] = None, scale: Optional[float] = None):
  """A chunk of T new tokens at cache slots index..index+T-1 (index: a scalar, or one per row
  [B]) attends to the cache's first `index`
  slots and (causally) to itself; the cache is only read, never updated here.

  k, v [B, T, Hkv, D]: the chunk's keys/values; k_cache, v_cache [B, Hkv, S, D] (heads-major, so
  each (row, head) is one contiguous [S, D] matrix for the batched matmuls); segment_ids [B, T] of
  the chunk and cache_segment_ids [B, S] of the cache slots (keys match queries by id). The
  caller writes the chunk into the cache once, after all layers, so a decode step never copies a
  layer's cache."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  t, s = q.shape[1], k_cache.shape[2]
  index = jnp.reshape(index, (-1, 1, 1))   # one index for all rows, or one per row
  qi = jnp.arange(t)[None, :, None] + index
  kj = jnp.arange(s)[None, None, :]
  old = (kj < index) & (segment_ids[:, :, None] == cache_segment_ids[:, None, :])
  if sliding_window is not None:
    old = old & (qi - kj < sliding_window)
  new = attention_mask(t, t, causal=True, segment_ids=segment_ids, sliding_window=sliding_window)
  return _xla_parts(q, ((k_cache, v_cache, old, "bksd"), (k, v, new, "bskd")), scale)
