"""Llama 2/3, Vicuna and Mistral decoder (HF LlamaForCausalLM / MistralForCausalLM numerics).

RoPE uses HF's rotate-half convention so q/k kernels import without permutation; inverse frequencies
are computed in float32 exactly as HF does (llama3 scaling included) so logits match to float32
rounding. Layers are one `nn.scan` over a remat'ed block. An optional explicit KV cache (k, v per
layer, stacked on the layer axis) makes the same code serve prefill and decode; layers read it and
return only the new tokens' k/v, which are written after the scan.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vlm.attention import attend, attend_cached
from vlm.config import LlamaConfig, LoraConfig
from vlm.families.module import Part, remat
from vlm.lora import Dense
from vlm.sharding import constrain

# Logical layouts of the decoder's activations (vlm/sharding.py maps them to the mesh).
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """[head_dim // 2] float32 inverse frequencies, HF's default or llama3-scaled variant."""
  d = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
         ).astype(np.float32)
  if cfg.rope_scaling is None:
    return inv
  kind, factor, low, high, old_ctx = cfg.rope_scaling
  if kind != "llama3":
    raise ValueError(f"rope scaling {kind!r} not supported")
  factor, low, high, old_ctx = (np.float32(factor), np.float32(low), np.float32(high),
                                np.float32(old_ctx))
  low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
  wavelen = np.float32(2 * np.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old_ctx / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """x [B, T, H, D], positions [B, T] -> rotated x (rotate-half convention)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb)[:, :, None].astype(x.dtype), jnp.sin(emb)[:, :, None].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * xf.astype(self.dtype)


def _dense(name, features, axes, lora: LoraConfig, dtype, **kw):
  rank = lora.rank if name in lora.targets else 0
  return Dense(features, axes, dtype=dtype, lora_rank=rank, lora_alpha=lora.alpha,
               lora_dropout=lora.dropout, name=name, **kw)


class Attention(Part):
  @nn.compact
  def __call__(self, x, positions, segment_ids, kv, cache_meta, deterministic):
    c, b, t = self.cfg, x.shape[0], x.shape[1]
    dense = lambda n, f, ax: _dense(n, f, ax, self.lora, self.dtype)
    q = dense("q", c.heads * c.head_dim, ("embed", "heads"))(x, deterministic)
    k = dense("k", c.kv_heads * c.head_dim, ("embed", "kv"))(x, deterministic)
    v = dense("v", c.kv_heads * c.head_dim, ("embed", "kv"))(x, deterministic)
    inv = rope_inv_freq(c)
    q = apply_rope(q.reshape(b, t, c.heads, c.head_dim), positions, inv)
    k = apply_rope(k.reshape(b, t, c.kv_heads, c.head_dim), positions, inv)
    v = v.reshape(b, t, c.kv_heads, c.head_dim)
    q, k, v = constrain(q, HEADS), constrain(k, KV_HEADS), constrain(v, KV_HEADS)
    q, k, v = checkpoint_name(q, "q_proj"), checkpoint_name(k, "k_proj"), checkpoint_name(v, "v_proj")
    if kv is None:  # training, or a prompt filling an empty cache: the chunk sees only itself
      out = attend(q, k, v, causal=True, segment_ids=segment_ids, sliding_window=c.sliding_window,
                   impl=self.runtime.attention)
    else:  # the chunk sees the cache's filled slots and itself; the cache is only read here
      out = attend_cached(q, k, v, kv[0].astype(q.dtype), kv[1].astype(q.dtype),
                          index=cache_meta["index"], segment_ids=segment_ids,
                          cache_segment_ids=cache_meta["segment_ids"],
                          sliding_window=c.sliding_window)
    new_kv = None if cache_meta is None else (k, v)  # written into the cache after the scan
    out = checkpoint_name(constrain(out, HEADS).reshape(b, t, c.heads * c.head_dim), "attn_out")
    return dense("o", c.hidden, ("heads", "embed"))(out, deterministic), new_kv


class MLP(Part):
  @nn.compact
  def __call__(self, x, deterministic):
    c = self.cfg
    gate = _dense("gate", c.mlp_dim, ("embed", "mlp"), self.lora, self.dtype)(x, deterministic)
    up = _dense("up", c.mlp_dim, ("embed", "mlp"), self.lora, self.dtype)(x, deterministic)
    h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return _dense("down", c.hidden, ("mlp", "embed"), self.lora, self.dtype)(h, deterministic)


class DecoderLayer(Part):
  @nn.compact
  def __call__(self, x, positions, segment_ids, kv, cache_meta, deterministic):
    c = self.cfg
    x = constrain(x, RESIDUAL)
    h, new_kv = self.child(Attention, "attn")(
        RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x), positions, segment_ids, kv, cache_meta,
        deterministic)
    x = constrain(x + h, RESIDUAL)
    x = x + self.child(MLP, "mlp")(RMSNorm(c.norm_eps, self.dtype, name="mlp_norm")(x),
                                   deterministic)
    return constrain(x, RESIDUAL), new_kv


class _ScanBody(Part):
  """scan-friendly wrapper: carry = hidden states, per-layer input = the layer's KV cache (read
  only), per-layer output = this chunk's k/v."""

  @nn.compact
  def __call__(self, x, kv, positions, segment_ids, cache_meta, deterministic):
    layer = remat(DecoderLayer, self.runtime.remat, static_argnums=(6,))
    return self.child(layer, "layer")(x, positions, segment_ids, kv, cache_meta, deterministic)


class Llama(Part):
  """Token embedding, decoder stack and LM head. `embed()` and `__call__()` are separate so the VLM
  can write image features into the embeddings in between. runtime.scan_layers=False: a Python
  loop over per-layer modules (llm/layers_0, ...) instead of one scanned stack."""

  def setup(self):
    c = self.cfg
    self.embedding = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (c.vocab_size, c.hidden), jnp.float32)
    if self.runtime.scan_layers:
      self.layers = nn.scan(
          _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=c.layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg=c, lora=self.lora, runtime=self.runtime, name="layers")
    else:
      self.layers = [self.child(_ScanBody, f"layers_{i}") for i in range(c.layers)]
    self.norm = RMSNorm(c.norm_eps, self.dtype, name="norm")
    if not c.tie_embeddings:
      self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, name="lm_head")

  def embed(self, input_ids):
    ids = jnp.clip(input_ids, 0, self.cfg.vocab_size - 1)
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def __call__(self, h, positions, segment_ids=None, cache=None, deterministic=True,
               return_hidden=False):
    """h [B, T, D] embeddings -> float32 logits [B, T, V] (and the updated cache when given).

    cache: {"k", "v": [L, B, Hkv, S, Dh] (scan) or a tuple of L [B, Hkv, S, Dh] (scan=False),
    "segment_ids": [B, S] (already holding this chunk's ids), "index": the slot of the chunk's
    first token, one for all rows or one per row [B]}. The chunk attends to the slots before `index` and to itself; the layers only
    read the cache and return the chunk's k/v, written here with one update per buffer (in place
    under a donating jit or a while loop) instead of a copy of every layer's cache per step. An
    index given as the Python int 0 marks an empty cache: the prompt then attends only to itself,
    through the fused attention kernels."""
    kv = meta = None
    h = constrain(h, RESIDUAL)
    if cache is not None:
      idx = cache["index"]
      empty = isinstance(idx, int) and idx == 0
      kv = None if empty else (cache["k"], cache["v"])
      meta = {"index": idx, "segment_ids": cache["segment_ids"]}
    if self.runtime.scan_layers:
      h, new_kv = self.layers(h, kv, positions, segment_ids, meta, deterministic)
    else:
      outs = []
      for i, layer in enumerate(self.layers):
        h, o = layer(h, None if kv is None else (kv[0][i], kv[1][i]), positions, segment_ids,
                     meta, deterministic)
        if kv is not None:
          # Make the layer's new k/v depend on its output, which read the cache: XLA then orders
          # that read before the in-place write below. Without a data dependency its copy
          # insertion copies every cache buffer each step (optimization barriers are gone by then).
          o = jax.tree.map(lambda x: x + (h[0, 0, 0] * 0).astype(x.dtype), o)
        outs.append(o)
      new_kv = None if meta is None else tuple(zip(*outs))
    h = constrain(self.norm(h), RESIDUAL)
    out = h if return_hidden else self.logits(h)
    if cache is None:
      return out

    def write(buf, x):  # x [..., B, T, Hkv, Dh] -> slots index.. of buf [..., B, Hkv, S, Dh]
      x = jnp.swapaxes(x, -3, -2).astype(buf.dtype)
      idx = cache["index"]
      if jnp.ndim(idx) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf, x, idx, axis=buf.ndim - 2)
      # one index per row (the serving engine's slots, each at its own length)
      row = lambda b, y, i: jax.lax.dynamic_update_slice_in_dim(b, y, i, axis=b.ndim - 2)
      ax = buf.ndim - 4
      return jax.vmap(row, in_axes=(ax, ax, 0), out_axes=ax)(buf, x, idx)
    return out, dict(cache, k=jax.tree.map(write, cache["k"], new_kv[0]),
                     v=jax.tree.map(write, cache["v"], new_kv[1]))

  def logits(self, h):
    """Hidden states (after the final norm) -> float32 logits; used by chunked losses."""
    if self.cfg.tie_embeddings:
      out = jnp.einsum("btd,vd->btv", h, self.embedding.astype(self.dtype))
    else:
      out = self.lm_head(h)
    return constrain(out, ("activation_batch", "activation_length", "activation_vocab")).astype(
        jnp.float32)
