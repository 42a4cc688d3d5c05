"""Per-request sampling: the parameters (checked in one place) and the per-row sampler of the decode
step.

`SamplingParams` is what a request asks for (vLLM's SamplingParams is the model): `validate()`
checks every field and raises SamplingError naming the field and its allowed range, so the CLI
says it in one line and the server in a 400. `rows()` turns a slot's parameters into the fixed-shape
arrays the decode step reads, so requests with different parameters share one program.

`sample()` runs inside the decode step over all slots at once, each row with its own parameters,
in vLLM's order (OpenAI's definitions):
  1. penalties over the row's generated tokens (count[t]: times t was generated so far):
     logits[t] -= presence * (count[t] > 0) + frequency * count[t]
  2. logit_bias: logits[t] += bias[t]
  3. temperature 0: the exact argmax of that; else divide by the temperature, keep the top_k
     largest (0: all; ties kept), then the smallest set of those whose probability reaches top_p,
     and draw from the rest with the row's key folded with its step (a row's draws do not depend
     on its slot or on the other rows).
Logprobs (the chosen token's and the top 20) are of the model's own distribution: the log-softmax
of the raw logits, before penalties, bias, temperature and filtering (OpenAI's and vLLM's default).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import numpy as np

MAX_LOGIT_BIAS = 300     # OpenAI's bound on logit_bias entries; a fixed-size row on the device
MAX_TOP_LOGPROBS = 20    # OpenAI's bound on top_logprobs; the step always computes this many
MAX_STOP = 16            # stop strings per request
SEED_RANGE = (-2**63, 2**64 - 1)


class SamplingError(ValueError):
  """A sampling parameter outside its range; `field` names it."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field} {message}")
    self.field = field


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's sampling. seed None: a fresh random seed per request (drawn on the host), so
  repeated requests give different samples; stop_token_ids None: the template's end-of-turn
  tokens, () none (run to max_tokens)."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: Optional[int] = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)
  logprobs: bool = False
  top_logprobs: int = 0
  max_tokens: int = 256
  stop: tuple = ()
  stop_token_ids: Optional[tuple] = None

  def replace(self, **kw) -> "SamplingParams":
    return dataclasses.replace(self, **kw)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def validate(self, vocab_size: Optional[int] = None) -> "SamplingParams":
    """Every field's range, or SamplingError naming the field and its range. Returns self."""
    def number(name, lo, hi, *, integer=False, lo_open=False):
      x = getattr(self, name)
      kind = "an integer" if integer else "a number"
      if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or (
          integer and x != int(x)) or (not integer and not math.isfinite(x)):
        raise SamplingError(name, f"must be {kind}, got {x!r:.40}")
      if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise SamplingError(name, f"must be in {rng}, got {x}")

    number("temperature", 0.0, None)
    number("top_p", 0.0, 1.0, lo_open=True)
    number("top_k", 0, None, integer=True)
    number("presence_penalty", -2.0, 2.0)
    number("frequency_penalty", -2.0, 2.0)
    number("top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    number("max_tokens", 1, None, integer=True)
    if self.seed is not None:
      number("seed", *SEED_RANGE, integer=True)
    if not isinstance(self.logprobs, bool):
      raise SamplingError("logprobs", f"must be true or false, got {self.logprobs!r:.40}")
    if self.top_logprobs and not self.logprobs:
      raise SamplingError("top_logprobs", "needs logprobs to be true")
    if not isinstance(self.logit_bias, Mapping) or len(self.logit_bias) > MAX_LOGIT_BIAS:
      raise SamplingError("logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to biases")
    top = vocab_size - 1 if vocab_size else None
    for t, b in self.logit_bias.items():
      if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 or (
          top is not None and t > top):
        raise SamplingError("logit_bias", f"keys must be token ids in [0, {top or 'vocab'}], "
                            f"got {t!r:.40}")
      if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
        raise SamplingError("logit_bias", f"values must be in [-100, 100], got {b!r:.40}")
    if (not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in self.stop)):
      raise SamplingError("stop", f"must be at most {MAX_STOP} non-empty strings")
    if self.stop_token_ids is not None and not all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0
        for t in self.stop_token_ids):
      raise SamplingError("stop_token_ids", "must be token ids (integers >= 0)")
    return self


def seed_words(seed: Optional[int]) -> np.ndarray:
  """A seed (None: 64 fresh random bits from the OS) -> the uint32 [2] data of a threefry key."""
  if seed is None:
    seed = int.from_bytes(np.random.default_rng().bytes(8), "little")
  s = int(seed) % 2**64
  return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)


def rows(slots: int) -> dict:
  """Host arrays of `slots` neutral rows (greedy, no penalties): the decode state's parameters."""
  return {"temperature": np.zeros(slots, np.float32), "top_p": np.ones(slots, np.float32),
          "top_k": np.zeros(slots, np.int32), "presence": np.zeros(slots, np.float32),
          "frequency": np.zeros(slots, np.float32),
          "bias_ids": np.full((slots, MAX_LOGIT_BIAS), -1, np.int32),
          "bias": np.zeros((slots, MAX_LOGIT_BIAS), np.float32),
          "key": np.zeros((slots, 2), np.uint32)}


def row(p: SamplingParams) -> dict:
  """One request's row of `rows()` (its seed drawn here when None)."""
  r = {k: v[0] for k, v in rows(1).items()}
  r.update(temperature=np.float32(p.temperature), top_p=np.float32(p.top_p),
           top_k=np.int32(p.top_k), presence=np.float32(p.presence_penalty),
           frequency=np.float32(p.frequency_penalty), key=seed_words(p.seed))
  ids = np.fromiter(p.logit_bias.keys(), np.int32, len(p.logit_bias))
  r["bias_ids"][:len(ids)] = ids
  r["bias"][:len(ids)] = np.fromiter(p.logit_bias.values(), np.float32, len(ids))
  return r


# --- the device side -----------------------------------------------------------------------------

def processed(logits, counts, r):
  """Steps 1-3 before the draw: [S, V] float32 logits with penalties and bias applied, divided by
  the temperature (greedy rows: not divided) and filtered (-inf outside top-k / top-p)."""
  import jax
  import jax.numpy as jnp
  s, v = logits.shape
  x = logits - r["presence"][:, None] * (counts > 0) - r["frequency"][:, None] * counts
  ids = r["bias_ids"]
  x = x.at[jnp.arange(s)[:, None], jnp.clip(ids, 0, v - 1)].add(jnp.where(ids >= 0, r["bias"], 0))
  hot = r["temperature"] > 0
  x = jnp.where(hot[:, None], x / jnp.where(hot, r["temperature"], 1.0)[:, None], x)

  def filtered(x):
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where(r["top_k"] > 0, jnp.minimum(r["top_k"], v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(jnp.arange(v) < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < r["top_p"][:, None]  # smallest prefix >= top_p
    n_keep = jnp.where(r["top_p"] < 1, jnp.maximum(keep.sum(-1), 1), k)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(need[:, None] & ((x < kth) | (x < pth)), -jnp.inf, x)

  need = hot & ((r["top_k"] > 0) | (r["top_p"] < 1))
  return jax.lax.cond(need.any(), filtered, lambda x: x, x)


def sample(logits, counts, r, steps, *, top_logprobs: bool = True):
  """-> (tokens [S] int32, logprobs [S], top ids [S, 20], top logprobs [S, 20]); `steps` [S]:
  tokens each row generated so far (folded into its key). The top-20 are computed only when
  `top_logprobs` (a traced bool: skipped in steps where no row asked)."""
  import jax
  import jax.numpy as jnp
  x = processed(logits, counts, r)
  keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(r["key"]), steps)
  drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x)
  tok = jnp.where(r["temperature"] > 0, drawn, jnp.argmax(x, axis=-1)).astype(jnp.int32)
  lp = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
  s, v = logits.shape
  n = min(MAX_TOP_LOGPROBS, v)
  top = jax.lax.cond(
      top_logprobs, lambda lp: tuple(jax.lax.top_k(lp, n))[::-1],
      lambda lp: (jnp.zeros((s, n), jnp.int32), jnp.zeros((s, n), lp.dtype)), lp)
  return tok, chosen, top[0], top[1]
