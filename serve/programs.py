"""The serving engine's device programs: pure functions over an explicit decode state (JetStream's
engine shape), compiled once per `Layout` for a model.

  encode(params, table, i, pixels, sizes) -> table        one image's features into row i
  prefill(params, state, table, counts, slot, ids, start, n, first) -> state
      one chunk of a prompt into `slot`'s cache at columns start.., continuing whatever the slot
      already holds (a conversation's earlier turns); the slot's pending logits become those of
      the chunk's last real token
  insert(state, slot, row) -> state                       a request's sampling row into `slot`
  generate(params, state, active, want_top) -> (state, out)
      one step for every slot at once, each at its own length: sample from the pending logits
      (serve/sampling.py), feed the token, keep its logits; inactive slots write a scratch column

The state holds a KV cache of `slots` rows of `cache_len + 1` columns (the last one: the scratch
column), per-slot lengths, pending logits, generated-token counts (penalties) and sampling rows.
Shapes are static: one program per prefill chunk length plus four, all compiled before serving
(`Programs.compile`); `abstract_args` gives the same programs' arguments as shapes, so
`train.aot` can compile what the server runs for a target it does not have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from serve import sampling
from vlm import sharding
from vlm.model import VLM, merge_image_features


@dataclasses.dataclass(frozen=True)
class Layout:
  """What the programs are compiled for. cache_len: tokens one slot holds (prompt + answer, and a
  conversation's earlier turns); chunks: the prefill chunk lengths (a prompt is prefilled in
  chunks of the largest, its tail in the smallest that holds it); max_images: image rows of the
  feature table a prompt's images are encoded into."""
  slots: int
  cache_len: int
  chunks: tuple = (16, 64, 256)
  max_images: int = 8
  cache_dtype: str = "float32"

  @property
  def columns(self) -> int:
    return self.cache_len + 1

  def kv_bytes(self, config) -> int:
    """Bytes of the whole KV cache."""
    return kv_bytes_per_token(config, self.cache_dtype) * self.slots * self.columns


def kv_bytes_per_token(config, cache_dtype) -> int:
  """K and V of every layer for one token."""
  c = config.llm
  return 2 * c.layers * c.kv_heads * c.head_dim * jnp.dtype(cache_dtype).itemsize


@contextlib.contextmanager
def _nothing():
  yield


class Programs:
  """The jitted programs of one (model config, runtime, mesh, rules, layout); `lru` keyed, so
  every engine of that shape shares them."""

  def __init__(self, config, runtime, mesh, rules, layout: Layout):
    self.config, self.runtime, self.mesh, self.rules, self.layout = (config, runtime, mesh, rules,
                                                                     layout)
    self.model = VLM(config, runtime)
    self.jit = {
        "init": jax.jit(self._init),
        "encode": jax.jit(self._encode, donate_argnums=(1,)),
        "prefill": jax.jit(self._prefill, donate_argnums=(1,)),
        "insert": jax.jit(self._insert, donate_argnums=(0,)),
        "generate": jax.jit(self._generate, donate_argnums=(1,)),
    }

  # --- placement --------------------------------------------------------------------------------

  def _spec(self, x, logical):
    return NamedSharding(self.mesh, sharding.spec_for(logical, x.shape, self.mesh, self.rules))

  def _pin(self, x, logical):
    return x if self.mesh is None else jax.lax.with_sharding_constraint(x, self._spec(x, logical))

  def _logical(self, state):
    """Logical axes of every state leaf (slots on 'batch', the cache's heads on 'kv')."""
    kv = ("layers", "batch", "kv", None, None) if self.runtime.scan_layers else (
        "batch", "kv", None, None)
    out = {k: ("batch",) + (None,) * (np.ndim(v) - 1) for k, v in state.items()
           if k not in ("k", "v", "rows")}
    out["rows"] = {k: ("batch",) + (None,) * (np.ndim(v) - 1) for k, v in state["rows"].items()}
    out["k"] = out["v"] = kv if self.runtime.scan_layers else tuple(kv for _ in state["k"])
    return out

  def _pin_state(self, state):
    if self.mesh is None:
      return state
    return jax.tree.map(self._pin, state, self._logical(state),
                        is_leaf=lambda x: isinstance(x, tuple) and all(
                            a is None or isinstance(a, str) for a in x))

  def _active(self):
    return _nothing() if self.mesh is None else sharding.activation_sharding(self.mesh, self.rules)

  # --- the programs -----------------------------------------------------------------------------

  def _init(self):
    c, lay = self.config.llm, self.layout
    shape = (lay.slots, c.kv_heads, lay.columns, c.head_dim)
    dt = jnp.dtype(lay.cache_dtype)
    kv = (lambda: jnp.zeros((c.layers,) + shape, dt)) if self.runtime.scan_layers else (
        lambda: tuple(jnp.zeros(shape, dt) for _ in range(c.layers)))
    s, v = lay.slots, c.vocab_size
    state = {"k": kv(), "v": kv(), "logits": jnp.zeros((s, v), jnp.float32),
             "counts": jnp.zeros((s, v), jnp.int32), "length": jnp.zeros((s,), jnp.int32),
             "steps": jnp.zeros((s,), jnp.int32),
             "rows": jax.tree.map(jnp.asarray, sampling.rows(s))}
    return self._pin_state(state)

  def one_image(self, dtype=jnp.uint8):
    """Shapes of one image's pixels and sizes as the encode program takes them."""
    c = self.config
    if c.tiler.kind == "anyres":
      t, s = c.tiler.max_tiles(c.vision), c.vision.image_size
      return (jax.ShapeDtypeStruct((1, 1, t, s, s, 3), dtype),
              jax.ShapeDtypeStruct((1, 1, 4), jnp.int32))
    s = c.tiler.input_size(c.vision)
    return jax.ShapeDtypeStruct((1, 1, s, s, 3), dtype), None

  def table_shape(self, params):
    """The feature table a prompt's images are encoded into: [max_images, F, D] (text-only
    models: a [1, 1, 1] stand-in)."""
    if self.config.vision is None:
      return jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)
    f = jax.eval_shape(lambda p, x, s: self.model.apply({"params": p}, x, s,
                                                        method=VLM.encode_images)[0],
                       params, *self.one_image())
    return jax.ShapeDtypeStruct((self.layout.max_images,) + f.shape[2:], f.dtype)

  def _encode(self, params, table, i, pixels, sizes):
    with self._active():
      feats, _ = self.model.apply({"params": params}, pixels, sizes, method=VLM.encode_images)
    return jax.lax.dynamic_update_index_in_dim(table, feats[0, 0].astype(table.dtype), i, 0)

  def _prefill(self, params, state, table, counts, slot, ids, start, n, first):
    """ids [1, T] (T a chunk length) at columns start..start+T-1 of `slot`; the first `n` are
    real; `first`: image placeholders of the prompt before `start`."""
    m, lay, t = self.model, self.layout, ids.shape[1]
    state = dict(state)
    with self._active():
      h = m.apply({"params": params}, ids, method=lambda mod, x: mod.llm.embed(x))
      if self.config.vision is not None:
        real = jnp.arange(t)[None] < n
        h = merge_image_features(h, (ids == self.config.image_token_id) & real, table[None],
                                 counts[None], first)
      bax = 1 if self.runtime.scan_layers else 0
      take = lambda buf: jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=bax)
      cache = {"k": jax.tree.map(take, state["k"]), "v": jax.tree.map(take, state["v"]),
               "index": start, "segment_ids": jnp.ones((1, lay.columns), jnp.int32)}
      seg = (jnp.arange(t)[None] < n).astype(jnp.int32)
      hid, cache = m.apply({"params": params}, h, start + jnp.arange(t)[None], seg, cache, True,
                           True, method=lambda mod, *a: mod.llm(*a))
      last = jax.lax.dynamic_slice_in_dim(hid, n - 1, 1, axis=1)
      logits = m.apply({"params": params}, last, method=VLM.logits)[:, 0]
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), slot, bax)
    state["k"] = jax.tree.map(put, state["k"], cache["k"])
    state["v"] = jax.tree.map(put, state["v"], cache["v"])
    state["logits"] = jax.lax.dynamic_update_slice_in_dim(state["logits"], logits, slot, 0)
    state["length"] = state["length"].at[slot].set(start + n)
    return self._pin_state(state)

  def _insert(self, state, slot, row):
    state = dict(state)
    state["rows"] = jax.tree.map(lambda a, x: a.at[slot].set(x), state["rows"], row)
    state["counts"] = state["counts"].at[slot].set(0)
    state["steps"] = state["steps"].at[slot].set(0)
    return self._pin_state(state)

  def _generate(self, params, state, active, want_top):
    state, lay = dict(state), self.layout
    tok, lp, top_ids, top_lp = sampling.sample(state["logits"], state["counts"], state["rows"],
                                               state["steps"], top_logprobs=want_top)
    col = jnp.where(active, state["length"], lay.cache_len)   # free slots: the scratch column
    cache = {"k": state["k"], "v": state["v"], "index": col,
             "segment_ids": jnp.ones((lay.slots, lay.columns), jnp.int32)}
    with self._active():
      out, cache = self.model.apply({"params": params}, tok[:, None], positions=col[:, None],
                                    segment_ids=jnp.ones((lay.slots, 1), jnp.int32), cache=cache)
    on = active.astype(jnp.int32)
    state.update(k=cache["k"], v=cache["v"], logits=out[:, 0], length=state["length"] + on,
                 steps=state["steps"] + on,
                 counts=state["counts"].at[jnp.arange(lay.slots), tok].add(on))
    return self._pin_state(state), (tok, lp, top_ids, top_lp)

  # --- abstract arguments (start-up compile, compile-for-target) --------------------------------

  def abstract_args(self, params) -> dict:
    """name -> the positional arguments of that program as shapes (with shardings on a mesh);
    `params`: real or abstract. One entry per prefill chunk length ('prefill/<T>')."""
    lay = self.layout
    state = jax.eval_shape(self.jit["init"])
    if self.mesh is not None:
      state = jax.tree.map(lambda x, ax: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                              sharding=self._spec(x, ax)),
                           state, self._logical(state),
                           is_leaf=lambda x: isinstance(x, tuple) and all(
                               a is None or isinstance(a, str) for a in x))
    table = self.table_shape(params)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    counts = jax.ShapeDtypeStruct((table.shape[0],), jnp.int32)
    out = {"generate": (params, state, jax.ShapeDtypeStruct((lay.slots,), jnp.bool_),
                        jax.ShapeDtypeStruct((), jnp.bool_)),
           "insert": (state, i32, jax.tree.map(lambda x: jax.ShapeDtypeStruct(
               np.shape(x)[1:], np.asarray(x).dtype), sampling.rows(1)))}
    for t in lay.chunks:
      out[f"prefill/{t}"] = (params, state, table, counts, i32,
                             jax.ShapeDtypeStruct((1, t), jnp.int32), i32, i32, i32)
    if self.config.vision is not None:
      out["encode"] = (params, table, i32) + self.one_image()
    return out


@functools.lru_cache(maxsize=16)
def programs(config, runtime, mesh, rules, layout: Layout) -> Programs:
  return Programs(config, runtime, mesh, rules, layout)


def lowered(config, runtime, layout: Layout, params, *, mesh=None,
            rules=sharding.DEFAULT_RULES) -> dict:
  """name -> jax `Lowered` of every program the engine runs for this model and layout; `params`
  may be abstract (jax.ShapeDtypeStruct leaves, with shardings on a mesh). `.compile()` each, and
  vlm.compiled.ProgramMemory.of(...) tells what it needs per device (train.aot)."""
  rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules)
  p = programs(config, runtime, mesh, rules, layout)
  return {name: p.jit[name.split("/")[0]].lower(*args)
          for name, args in p.abstract_args(params).items()}
