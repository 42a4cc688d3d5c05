"""Batched generation: one jitted prefill (image features included) + a KV-cache decode loop.

Rows of different prompt lengths share a batch by left padding: pad slots carry segment id 0 and
real tokens 1, positions restart at 0 on each row's first real token, so every row attends to
exactly what it would alone. Shapes are bucketed (prompt length, cache length, batch) so a stream of
prompts compiles a handful of programs. The decode loop is a `lax.while_loop` that runs up to a
dynamic step limit: without streaming or stop strings it runs to the end in one call; otherwise it
runs in chunks and the host decodes text between chunks. Both programs trace the model inside
`sharding.activation_sharding(mesh, rules)`, as the train and eval steps do: on a mesh the
Generator's rules (default DEFAULT_RULES, a run's config.sharding_rules where it has its own) place
the weights, the cache and every block's activations.

  gen = Generator.from_checkpoint(CKPT)                       # or Generator(model, params, tok)
  prompt = build_prompt(gen.config, gen.tokenizer, "What is shown?", [image])
  [out] = gen.generate([prompt], GenerationConfig(max_new_tokens=64))
  out.text, out.tokens, out.finish_reason
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from vlm import sharding
from vlm.config import Runtime
from vlm.model import VLM, unstack_layers
from data.tokenizer import load_tokenizer
from serve.prompt import Prompt

MAX_STOP_IDS = 8  # stop ids travel as a fixed-size array: no recompile per template
STREAM_CHUNK = 1  # decode steps between host callbacks when streaming
STOP_STRING_CHUNK = 16  # ... when only stop strings need the host


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """temperature 0 is greedy; otherwise HF's order: temperature, top-k (0: off), top-p (1: off).
  stop_token_ids None takes the template's (Llama-3: <|eot_id|>, <|end_of_text|>; else eos)."""
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop_token_ids: Optional[Sequence[int]] = None
  stop_strings: Sequence[str] = ()


def add_sampling_args(p, *, max_new_tokens: int) -> None:
  """The sampling flags every generating command shares (chat, VQA runs)."""
  p.add_argument("--system", default=None,
                 help="system prompt ('' for none; default: the checkpoint's config.json)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
  p.add_argument("--stop", action="append", default=[], metavar="STRING",
                 help="extra stop string (repeatable); template stop tokens always apply")


def sampling_config(args) -> "GenerationConfig":
  """GenerationConfig from the flags of add_sampling_args."""
  return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          stop_strings=tuple(args.stop))


@dataclasses.dataclass
class Generation:
  """tokens: generated ids before the stop token; text: decoded (special tokens skipped), cut at
  the first stop string and stripped; finish_reason: 'stop' (token or string) or 'length'."""
  tokens: np.ndarray
  text: str
  finish_reason: str
  logits: Optional[np.ndarray] = None  # float32 [steps, V] when return_logits=True


def bucket(n: int, step: int = 128, smallest: int = 8) -> int:
  """Static sizes: powers of two up to `step`, then multiples of `step`."""
  if n <= step:
    return max(smallest, 1 << max(0, n - 1).bit_length())
  return -(-n // step) * step


def sample_logits(logits, key, temperature, top_p, top_k):
  """logits [B, V] float32 -> [B] int32 samples, filtered like HF (temperature, top-k, top-p)."""
  v = logits.shape[-1]
  x = logits / jnp.maximum(temperature, 1e-6)
  desc = -jnp.sort(-x, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  desc = jnp.where(jnp.arange(v) < k, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the smallest prefix reaching top_p
  n_keep = jnp.maximum(keep.sum(-1), 1)
  threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
  x = jnp.where(x < threshold, -jnp.inf, x)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def _pad_id(config) -> int:
  return 0 if config.image_token_id != 0 else 1


def _constrain(x, logical, mesh, rules):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, sharding.spec_for(logical, x.shape, mesh, rules)))


def _activations(mesh, rules):
  """The rules pin activations on a mesh; without one, constraints stay no-ops."""
  return contextlib.nullcontext() if mesh is None else sharding.activation_sharding(mesh, rules)


# Programs are keyed by the (hashable) config and runtime, not by a Generator, so every Generator
# of the same model shape shares them.
@functools.partial(jax.jit, static_argnames=("config", "runtime", "mesh", "rules", "cache_dtype",
                                             "cache_len", "collect"))
def _prefill(params, ids, positions, segment_ids, lengths, pixels, image_sizes, *, config, runtime,
             mesh, rules, cache_dtype, cache_len, collect):
  """Runs the padded prompts through the model once, writing the cache; returns the decode state
  with the logits of each row's last prompt token."""
  with _activations(mesh, rules):
    return _prefill_body(params, ids, positions, segment_ids, lengths, pixels, image_sizes,
                         config, runtime, mesh, rules, cache_dtype, cache_len, collect)


def _prefill_body(params, ids, positions, segment_ids, lengths, pixels, image_sizes, config,
                  runtime, mesh, rules, cache_dtype, cache_len, collect):
  model, c = VLM(config, runtime), config.llm
  b, p = ids.shape
  shape, axes = (b, c.kv_heads, cache_len, c.head_dim), ("batch", "kv", None, None)
  if runtime.scan_layers:
    kv = lambda: _constrain(jnp.zeros((c.layers,) + shape, cache_dtype), ("layers",) + axes, mesh,
                            rules)
  else:  # one buffer per layer, like the weights: no layer slice of a stack is ever taken
    kv = lambda: tuple(_constrain(jnp.zeros(shape, cache_dtype), axes, mesh, rules)
                       for _ in range(c.layers))
  cache = {"k": kv(), "v": kv(), "index": 0,  # the int 0: an empty cache (vlm.llama)
           # generated tokens are real (1) from the start: future slots are hidden causally
           "segment_ids": jnp.concatenate([segment_ids, jnp.ones((b, cache_len - p), jnp.int32)],
                                          axis=1)}
  h, cache = model.apply({"params": params}, ids, pixels, image_sizes=image_sizes,
                         positions=positions, segment_ids=segment_ids, cache=cache,
                         return_hidden=True)
  logits = model.apply({"params": params}, h[:, -1:], method=VLM.logits)[:, 0]
  cache["index"] = jnp.int32(p)
  n = cache_len - p
  state = {"cache": cache, "logits": logits, "positions": lengths.astype(jnp.int32),
           "tokens": jnp.zeros((b, n), jnp.int32), "done": lengths == 0, "step": jnp.int32(0)}
  if collect:
    state["all_logits"] = jnp.zeros((b, n, logits.shape[-1]), jnp.float32)
  return state


@functools.partial(jax.jit, static_argnames=("config", "runtime", "mesh", "rules", "greedy",
                                             "collect"), donate_argnames=("state",))
def _decode(params, state, key, stop_at, stops, temperature, top_p, top_k, *, config, runtime,
            mesh, rules, greedy, collect):
  """Samples and feeds tokens until `stop_at` steps or every row is done."""
  model = VLM(config, runtime)

  def cond(s):
    return (s["step"] < stop_at) & ~jnp.all(s["done"])

  def body(s):
    step, logits = s["step"], s["logits"]
    if greedy:
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      tok = sample_logits(logits, jax.random.fold_in(key, step), temperature, top_p, top_k)
    tok = jnp.where(s["done"], _pad_id(config), tok)
    s = dict(s)
    if collect:
      s["all_logits"] = s["all_logits"].at[:, step].set(logits)
    s["tokens"] = s["tokens"].at[:, step].set(tok)
    s["done"] = s["done"] | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    out, cache = model.apply({"params": params}, tok[:, None], positions=s["positions"][:, None],
                             segment_ids=jnp.ones_like(tok)[:, None], cache=s["cache"])
    cache["index"] = cache["index"] + 1
    s.update(cache=cache, logits=out[:, 0], positions=s["positions"] + 1, step=step + 1)
    return s

  with _activations(mesh, rules):
    return jax.lax.while_loop(cond, body, state)


class Generator:
  """Holds a model, its params (optionally placed on a mesh) and tokenizer; compiles per bucket.

  scan_layers: the decoder's parameter layout while generating. None: one subtree per layer
  (False) except on TPUs. XLA:GPU copies a scanned stack's per-layer weight slice before each
  cuBLAS matmul (its dynamic-slice fusion is off by default), tripling the memory traffic of a
  bandwidth-bound decode step; XLA:CPU copies too (an 8-layer, 256-wide model decodes 2.2x faster
  at batch 1 unstacked: docs/benchmarks.md). XLA:TPU slices in place.
  rules: (logical axis, mesh axes) pairs placing weights, cache and activations on `mesh`.
  Converting copies the decoder weights: stacked device params are held twice until the caller
  drops them."""

  def __init__(self, model: VLM, params, tokenizer=None, *, mesh=None, cache_dtype=None,
               length_step: int = 128, scan_layers: Optional[bool] = None,
               rules=sharding.DEFAULT_RULES):
    if scan_layers is None:
      scan_layers = model.runtime.scan_layers and jax.default_backend() == "tpu"
    if model.runtime.scan_layers and not scan_layers:
      model = VLM(model.config, model.runtime.replace(scan_layers=False))
      params = unstack_layers(params)
    elif scan_layers and not model.runtime.scan_layers:
      raise ValueError("params are already unstacked (scan_layers=False); load them stacked")
    self.model, self.config, self.tokenizer, self.mesh = model, model.config, tokenizer, mesh
    # hashable: a static argument of the programs
    self.rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules)
    self.length_step = length_step
    self.timings: dict = {}  # of the last generate(): prefill_s (incl. compile), decode_s, ...
    self.cache_dtype = jnp.dtype(cache_dtype or model.runtime.dtype)
    if mesh is not None:
      params = sharding.shard(params, sharding.param_shardings(self.config, mesh, self.rules,
                                                               runtime=model.runtime))
    self.params = jax.device_put(params) if mesh is None else params  # host arrays: copy once

  @classmethod
  def from_checkpoint(cls, path: str, *, mesh=None, rules=sharding.DEFAULT_RULES,
                      dtype: Optional[str] = None, **overrides) -> "Generator":
    """A checkpoint dir of this project (tokenizer in path/tokenizer), a HF model dir or a
    train.main workdir (serve.workdir.resolve). `dtype` is the compute dtype (and the KV cache's;
    a HF dir's weights are cast to it as they load); None: the Runtime default, float32.
    `overrides` go to vlm.from_pretrained."""
    import vlm
    from serve import workdir
    path = workdir.resolve(path)
    tokenizer = load_tokenizer(path)   # first: a missing tokenizer fails before the weights load
    if dtype:
      overrides = {"dtype": dtype, **overrides,
                   "runtime": overrides.get("runtime", Runtime()).replace(dtype=dtype)}
    model, params = vlm.from_pretrained(path, **overrides)
    return cls(model, params, tokenizer, mesh=mesh, rules=rules)

  # --- host side -------------------------------------------------------------------------------

  def _place(self, x, logical):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(self.mesh, sharding.spec_for(logical, x.shape,
                                                                         self.mesh, self.rules)))

  def _batch(self, prompts: Sequence[Prompt], rows: int, width: int) -> dict:
    """Left-padded ids, positions, segment ids, lengths and stacked pixels for `rows` rows."""
    ids = np.full((rows, width), _pad_id(self.config), np.int32)
    pos = np.zeros((rows, width), np.int32)
    seg = np.zeros((rows, width), np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i, p in enumerate(prompts):
      n = len(p.ids)
      ids[i, width - n:], pos[i, width - n:], seg[i, width - n:] = p.ids, np.arange(n), 1
      lengths[i] = n
    out = {"ids": ids, "positions": pos, "segment_ids": seg, "lengths": lengths,
           "pixels": None, "image_sizes": None}
    with_px = [p for p in prompts if p.pixels is not None]
    if with_px:
      n_img = max(len(p.pixels) for p in with_px)
      px = np.zeros((rows, n_img) + with_px[0].pixels.shape[1:], with_px[0].pixels.dtype)
      s = self.config.vision.image_size  # absent images: a one-tile grid, never read
      sizes = np.tile(np.int32([s, s, 1, 1]), (rows, n_img, 1))
      for i, p in enumerate(prompts):
        if p.pixels is not None:
          px[i, :len(p.pixels)] = p.pixels
          if p.image_sizes is not None:
            sizes[i, :len(p.image_sizes)] = p.image_sizes
      out["pixels"] = px
      out["image_sizes"] = sizes if self.config.tiler.kind == "anyres" else None
    return out

  def stop_ids(self, gc: GenerationConfig) -> list:
    if gc.stop_token_ids is not None:
      return list(gc.stop_token_ids)
    if self.tokenizer is None:
      return []
    from data.conversation import stop_token_ids
    return stop_token_ids(self.tokenizer, self.config.template)

  def generate(self, prompts: Sequence[Prompt], gc: GenerationConfig = GenerationConfig(), *,
               stream: Optional[Callable[[int, str], None]] = None, return_logits: bool = False,
               batch_size: Optional[int] = None, limits: Optional[Sequence[int]] = None,
               cancel: Optional[Callable[[int], bool]] = None) -> list:
    """Generates for every prompt in one batch. `stream(row, text_delta)` is called as text
    becomes final (held back while it could still turn into a stop string); the deltas of a row
    add up to its Generation.text. `batch_size` pads the batch to a fixed row count (default: the
    next power of two) so batches share programs. A server batching requests passes each row's
    own token limit in `limits` (<= gc.max_new_tokens) and `cancel(row)`, asked between decode
    chunks, to stop rows whose client left (finish_reason 'cancelled')."""
    if not prompts:
      return []
    if gc.max_new_tokens < 1:
      raise ValueError("max_new_tokens must be at least 1")
    limits = np.minimum(np.asarray(limits if limits is not None else [gc.max_new_tokens]
                                   * len(prompts), np.int64), gc.max_new_tokens)
    if len(limits) != len(prompts) or (limits < 1).any():
      raise ValueError("limits: one token limit >= 1 per prompt")
    host_rows = bool(cancel) or bool((limits < gc.max_new_tokens).any())
    if (stream or gc.stop_strings) and self.tokenizer is None:
      raise ValueError("streaming and stop strings need a tokenizer")
    stops = self.stop_ids(gc)
    if len(stops) > MAX_STOP_IDS:
      raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(stops)}")
    rows = batch_size or bucket(len(prompts), step=8, smallest=1)
    if rows < len(prompts):
      raise ValueError(f"{len(prompts)} prompts do not fit batch_size {rows}")
    width = bucket(max(len(p.ids) for p in prompts), self.length_step)
    cache_len = bucket(width + gc.max_new_tokens, self.length_step)
    t0 = time.perf_counter()
    b = self._batch(prompts, rows, width)
    bx = lambda x, *axes: None if x is None else self._place(x, ("batch",) + axes)
    state = _prefill(
        self.params, bx(b["ids"], None), bx(b["positions"], None), bx(b["segment_ids"], None),
        bx(b["lengths"]), bx(b["pixels"], *([None] * (b["pixels"].ndim - 1)))
        if b["pixels"] is not None else None,
        bx(b["image_sizes"], None, None), config=self.config, runtime=self.model.runtime,
        mesh=self.mesh, rules=self.rules, cache_dtype=self.cache_dtype, cache_len=cache_len,
        collect=return_logits)
    jax.block_until_ready(state["logits"])
    t_prefill = time.perf_counter()
    args = (jax.random.key(gc.seed),)
    stop_arr = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_arr[:len(stops)] = stops
    dyn = (jnp.asarray(stop_arr), jnp.float32(gc.temperature), jnp.float32(gc.top_p),
           jnp.int32(gc.top_k))
    static = dict(config=self.config, runtime=self.model.runtime, mesh=self.mesh, rules=self.rules,
                  greedy=gc.temperature <= 0, collect=return_logits)
    texts = [_TextState(self.tokenizer, gc.stop_strings) for _ in prompts] if (
        stream or gc.stop_strings or host_rows) and self.tokenizer is not None else None
    chunk = STREAM_CHUNK if stream else STOP_STRING_CHUNK
    ends = [None] * len(prompts)   # (steps, reason) of rows ended by a limit or a cancel
    step = 0
    while step < gc.max_new_tokens:
      stop_at = gc.max_new_tokens
      if texts is not None or host_rows:
        open_limits = [int(n) for n, e in zip(limits, ends) if e is None and n > step]
        stop_at = min([step + chunk, gc.max_new_tokens] + open_limits)
      state = _decode(self.params, state, *args, jnp.int32(stop_at), *dyn, **static)
      step = int(state["step"])
      if texts is None and not host_rows:
        break
      # fetched whole and sliced on the host: a device slice per step would compile per length
      tokens, done = jax.device_get((state["tokens"], state["done"]))
      tokens = tokens[:, :step]
      finished = np.array(done)
      for i in range(len(prompts)):
        if ends[i] is None and not done[i] and (step >= limits[i] or (cancel and cancel(i))):
          ends[i] = (step, "length" if step >= limits[i] else "cancelled")
        t = texts[i] if texts is not None else None
        if t is not None and not t.closed:
          delta = t.update(tokens[i][:step if ends[i] is None else ends[i][0]], stops,
                           final=bool(done[i]) or ends[i] is not None or step >= gc.max_new_tokens)
          if stream and delta:
            stream(i, delta)
        finished[i] |= ends[i] is not None or (t is not None and t.stopped)
      if finished[:len(prompts)].all() or step >= gc.max_new_tokens:
        break
      if (finished != done).any():  # a stop string, limit or cancel ended a row: stop feeding it
        state["done"] = jnp.asarray(finished)
    out = self._results(prompts, state, stops, texts, return_logits, ends)
    self.timings = {"prefill_s": t_prefill - t0, "decode_s": time.perf_counter() - t_prefill,
                    "steps": int(state["step"]), "rows": rows, "prompt_width": width,
                    "cache_len": cache_len}
    return out

  def _results(self, prompts, state, stops, texts, return_logits, ends) -> list:
    step = int(state["step"])
    tokens = np.asarray(jax.device_get(state["tokens"]))[:, :step]
    logits = np.asarray(jax.device_get(state["all_logits"]))[:, :step] if return_logits else None
    out = []
    for i in range(len(prompts)):
      row = tokens[i] if ends[i] is None else tokens[i, :ends[i][0]]
      hit = np.flatnonzero(np.isin(row, stops)) if stops else np.array([], int)
      n, reason = (int(hit[0]), "stop") if hit.size else (
          len(row), "length" if ends[i] is None else ends[i][1])
      if texts is not None and texts[i].stopped:
        text, reason = texts[i].text, "stop"
      elif self.tokenizer is not None:
        text = self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).strip()
      else:
        text = ""
      # logits of every sampled step, the stop token's included
      out.append(Generation(row[:n], text, reason,
                            None if logits is None else logits[i, :min(n + 1, step)]))
    return out


class _TextState:
  """Incremental detokenization of one row: final text so far, cut at the first stop string.
  The deltas add up to the stripped text: leading whitespace is never sent, trailing whitespace
  waits for what follows it."""

  def __init__(self, tokenizer, stop_strings: Sequence[str]):
    self.tokenizer, self.stops = tokenizer, [s for s in stop_strings if s]
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.emitted, self.text, self.stopped, self.closed = 0, "", False, False

  def update(self, tokens: np.ndarray, stop_ids, final: bool) -> str:
    """New final text of this row given all its tokens so far."""
    if self.closed:
      return ""
    hit = np.flatnonzero(np.isin(tokens, stop_ids)) if len(stop_ids) else []
    if len(hit):
      tokens, final = tokens[:hit[0]], True
    text = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
    if cut >= 0:
      text, final, self.stopped = text[:cut], True, True
    # Hold back an incomplete UTF-8 sequence and anything that may still become a stop string.
    ready = len(text) if final else max(self.emitted, len(text.rstrip("\ufffd")) - self.hold)
    ready = min(ready, len(text.rstrip()))
    start = max(self.emitted, len(text) - len(text.lstrip()))
    delta = text[start:ready] if ready > start else ""
    self.emitted = max(self.emitted, ready)
    if final:
      self.text, self.closed = text.strip(), True
    return delta
