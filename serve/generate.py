"""Generation through the serving engine (serve/engine.py): a loaded model and the calls that
run prompts through it.

`Generator` holds a model, its params (unstacked on GPUs, placed on a mesh) and tokenizer;
`engine(layout)` gives the continuous-batching engine over them and `generate(prompts, params)` runs
a list of prompts through one to the end (CLIs, tests). On a mesh the rules (default
DEFAULT_RULES, a run's config.sharding_rules where it has its own) place the weights, the cache
and every block's activations.

  gen = Generator.from_checkpoint(CKPT)                       # or Generator(model, params, tok)
  prompt = build_prompt(gen.config, gen.tokenizer, "What is shown?", [image])
  [out] = gen.generate([prompt], SamplingParams(max_tokens=64))
  out.text, out.tokens, out.finish_reason
"""
from __future__ import annotations

import re
import time
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np

from data.errors import UserError
from data.tokenizer import load_tokenizer
from serve.engine import Engine, Generation, Request  # noqa: F401  (Generation: re-exported)
from serve.programs import Layout, kv_bytes_per_token
from serve.prompt import Prompt
from serve.sampling import SamplingError, SamplingParams
from vlm import sharding
from vlm.config import Runtime
from vlm.model import VLM, unstack_layers

CHUNKS = (16, 64, 256)   # prefill chunk lengths (the tail of a prompt takes the smallest that fits)


def add_sampling_args(p, *, max_new_tokens: int) -> None:
  """The sampling flags every generating command shares (chat, VQA runs, the server's defaults)."""
  p.add_argument("--system", default=None,
                 help="system prompt ('' for none; default: the checkpoint's config.json)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--seed", type=int, default=None,
                 help="sampling seed (default: a fresh random seed per request)")
  p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
  p.add_argument("--stop", action="append", default=[], metavar="STRING",
                 help="extra stop string (repeatable); template stop tokens always apply")


def sampling_params(args) -> SamplingParams:
  """SamplingParams from the flags of add_sampling_args, checked (UserError naming the flag)."""
  params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          stop=tuple(args.stop))
  try:
    return params.validate()
  except SamplingError as e:
    flag = {"max_tokens": "max-new-tokens"}.get(e.field, e.field.replace("_", "-"))
    raise UserError(f"--{flag}: {str(e)[len(e.field) + 1:]}") from None


def add_engine_args(p, *, slots: int) -> None:
  """The engine's size: decode slots and the KV cache they share."""
  p.add_argument("--slots", type=int, default=slots,
                 help=f"requests decoded at once (default {slots})")
  p.add_argument("--kv-cache", default=None, metavar="TOKENS|SIZE",
                 help="KV cache of all slots together, in tokens (e.g. 65536) or bytes (e.g. "
                      "16GiB, 512MiB); each slot holds its share (default: the model's context "
                      "per slot)")


def layout_from_args(args, config, cache_dtype) -> Layout:
  """The Layout of --slots and --kv-cache (UserError when they make no sense)."""
  if args.slots < 1:
    raise UserError(f"--slots must be at least 1, got {args.slots}")
  if args.kv_cache is None:
    per_slot = config.llm.max_positions
  else:
    total = parse_kv_cache(args.kv_cache, kv_bytes_per_token(config, cache_dtype))
    per_slot = total // args.slots - 1     # each slot also has its scratch column
    if per_slot < CHUNKS[0]:
      raise UserError(f"--kv-cache {args.kv_cache}: {total} tokens over {args.slots} slots "
                      f"leaves {max(per_slot, 0)} tokens per slot; give at least "
                      f"{(CHUNKS[0] + 1) * args.slots} tokens")
  return Layout(args.slots, per_slot, chunks_for(per_slot), cache_dtype=str(cache_dtype))


UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
         "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_kv_cache(text: str, bytes_per_token: int) -> int:
  """'65536' (tokens) or '16GiB' / '512MiB' / '2G' (bytes) -> tokens."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
  if not m or (m.group(2) and m.group(2).lower() not in UNITS):
    raise UserError(f"--kv-cache {text!r}: give tokens (65536) or a size (16GiB, 512MiB)")
  if not m.group(2):
    if "." in m.group(1):
      raise UserError(f"--kv-cache {text!r}: a token count is a whole number")
    return int(m.group(1))
  return int(float(m.group(1)) * UNITS[m.group(2).lower()]) // bytes_per_token


def chunks_for(cache_len: int) -> tuple:
  return tuple(sorted({min(c, cache_len + 1) for c in CHUNKS}))


def bucket(n: int, step: int = 128, smallest: int = 8) -> int:
  """Static sizes: powers of two up to `step`, then multiples of `step`."""
  if n <= step:
    return max(smallest, 1 << max(0, n - 1).bit_length())
  return -(-n // step) * step


class Generator:
  """Holds a model, its params (optionally placed on a mesh) and tokenizer.

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
    import jax.numpy as jnp
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
    self._engines: dict = {}
    self.timings: dict = {}   # of the last generate(): prefill_s (until every row had its first
                              # token, compiles included), decode_s (the rest), the layout
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

  def engine(self, layout: Layout, *, max_queue: int = 256) -> Engine:
    """The engine of this model for `layout` (one per layout, kept)."""
    if layout not in self._engines:
      self._engines[layout] = Engine(self.model, self.params, self.tokenizer, layout=layout,
                                     mesh=self.mesh, rules=self.rules, max_queue=max_queue)
    return self._engines[layout]

  def context_layout(self, slots: int) -> Layout:
    """`slots` slots of the model's whole context each."""
    n = self.config.llm.max_positions
    return Layout(slots, n, chunks_for(n), cache_dtype=str(self.cache_dtype))

  def layout(self, longest: int, slots: int) -> Layout:
    """A layout for `slots` rows of at most `longest` tokens (prompt + answer), bucketed so
    nearby sizes share programs."""
    n = bucket(longest, self.length_step)
    return Layout(slots, n, chunks_for(n), cache_dtype=str(self.cache_dtype))

  def generate(self, prompts: Sequence[Prompt],
               params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams(), *,
               stream: Optional[Callable[[int, str], None]] = None,
               slots: Optional[int] = None) -> list:
    """Runs every prompt through an engine of `slots` slots (default: one per prompt, up to 32,
    bucketed) to the end -> one engine.Generation each, in order. `params`: one for all or one
    per prompt. `stream(row, text_delta)` gets each row's text as it becomes final."""
    if not prompts:
      return []
    each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(each) != len(prompts):
      raise ValueError("params: one SamplingParams for all prompts or one per prompt")
    slots = slots or bucket(min(len(prompts), 32), step=8, smallest=1)
    longest = max(len(p.ids) + s.max_tokens for p, s in zip(prompts, each))
    eng = self.engine(self.layout(longest, slots))
    reqs = []
    for i, (p, s) in enumerate(zip(prompts, each)):
      on = (lambda e, i=i: e.text and stream(i, e.text)) if stream else None
      reqs.append(Request(p, s, on))
    for r in reqs:
      eng.check(r)   # every request checked before any runs
    t0 = time.perf_counter()
    eng.run(reqs)
    first = max((r.t_first for r in reqs if r.t_first), default=t0)
    self.timings = {"prefill_s": first - t0,
                    "decode_s": max(r.t_done or first for r in reqs) - first,
                    "slots": eng.layout.slots, "cache_len": eng.layout.cache_len}
    failed = next((r.error for r in reqs if r.error), None)
    if failed:
      raise RuntimeError(failed)
    return [r.result for r in reqs]
