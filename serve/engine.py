"""The continuous-batching engine behind everything that generates (server, serve.chat, VQA runs).

N decode slots share one KV cache (`Layout`: slots x tokens per slot). A request is prefilled
into a free slot in chunks (its images encoded first) while the other slots keep decoding: the
loop alternates one prefill chunk with one generate step over all slots (serve/programs.py), and
a slot whose row ended (stop, length, cancel) is free at the next step. A finished slot keeps its
cache: a later request whose prompt starts with the same tokens and images (a conversation's
next turn) takes that slot and prefills only what is new (conversation reuse; `stats` counts
the prefilled tokens and image encodes). All programs are compiled at start-up (`warmup`).

The interface (kept stable):

  engine = Engine(model, params, tokenizer, layout=Layout(slots=8, cache_len=4096))
  engine.warmup()                    # compile every program; check the KV cache fits the device
  req = Request(prompt, SamplingParams(temperature=0.7, max_tokens=64, logprobs=True),
                on_event=callback)
  engine.start(); engine.submit(req) # a host thread runs the loop (the server) ...
  engine.run([req, ...])             # ... or the caller's thread until these are done (CLIs)
  req.cancel()                       # the client left: its slot is free at the next step

Per request: `SamplingParams` (serve/sampling.py: temperature, top_p, top_k, seed, presence /
frequency penalty, logit_bias, logprobs, top_logprobs, max_tokens, stop strings, stop token ids;
`validate()`d at submit). `on_event(Event)` is called on the loop's thread (it must not block)
with, in order:
  Event(text=delta, tokens=(ids...), logprobs=(TokenLogprob...))   as text becomes final: the
      deltas add up to the answer; `tokens` are the answer tokens that text covers (a stop
      string's own tokens are never sent), `logprobs` one TokenLogprob each when asked for;
  Event(done=Generation)   last: tokens, text, finish_reason ('stop' | 'length' | 'cancelled'),
      logprobs, prompt_tokens and cached_tokens (prompt tokens reused, not prefilled);
  or Event(error=message)  last, when the engine failed on this request.
submit() raises RequestError (a ValueError naming the parameter) for what cannot run: a prompt
plus max_tokens over a slot's capacity, too many images, a bad sampling parameter; QueueFull
when `max_queue` requests already wait.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import threading
import time
from typing import Callable, Iterable, Optional

import jax
import numpy as np

from data.errors import UserError
from serve import programs as P
from serve.programs import Layout
from serve.prompt import Prompt
from serve.sampling import SamplingError, SamplingParams, row
from serve.text import TextState

log = logging.getLogger(__name__)


class RequestError(UserError):
  """A request the engine cannot run; `param` names the parameter at fault."""

  def __init__(self, message: str, param: Optional[str] = None):
    super().__init__(message)
    self.param = param


class QueueFull(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  token: int
  logprob: float
  top: tuple = ()   # ((token id, logprob), ...): the top_logprobs most likely, most likely first


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray
  text: str
  finish_reason: str
  logprobs: Optional[list] = None
  prompt_tokens: int = 0
  cached_tokens: int = 0


@dataclasses.dataclass
class Event:
  text: str = ""
  tokens: tuple = ()
  logprobs: tuple = ()
  done: Optional[Generation] = None
  error: Optional[str] = None


class Request:
  def __init__(self, prompt: Prompt, params: SamplingParams = SamplingParams(),
               on_event: Optional[Callable[[Event], None]] = None):
    self.prompt, self.params, self.on_event = prompt, params, on_event or (lambda e: None)
    self.cancelled, self.result, self.error = False, None, None
    self.t_first = self.t_done = None   # time.perf_counter() of the first token and of the end

  def cancel(self) -> None:
    self.cancelled = True


class _Live:
  """A request inside the engine: its slot, prefill plan and answer so far."""

  def __init__(self, req: Request, stops, tokenizer, image_id: int):
    self.req, self.p, self.stops = req, req.params, set(stops)
    self.ids = np.asarray(req.prompt.ids, np.int32)
    self.slot, self.pos, self.cached, self.plan, self.encode = None, 0, 0, [], []
    self.text = TextState(tokenizer, req.params.stop)
    self.logprobs, self.n = [], 0
    # images: (first placeholder, placeholders, content hash), in prompt order
    where = np.flatnonzero(self.ids == image_id)
    counts = _image_counts(req.prompt, len(where))
    firsts = np.cumsum([0] + counts[:-1]).astype(int)
    px = req.prompt.pixels
    self.images = [(int(where[f]) if len(where) else 0, c, _digest(px[i], req.prompt, i))
                   for i, (f, c) in enumerate(zip(firsts, counts))]


def _image_counts(prompt: Prompt, total: int) -> list:
  if prompt.pixels is None:
    return []
  n = len(prompt.pixels)
  counts = list(prompt.image_tokens) if prompt.image_tokens else [total // max(n, 1)] * n
  if sum(counts) != total:
    raise RequestError(f"the prompt has {total} image placeholders but its {n} images make "
                       f"{sum(counts)}", "messages")
  return counts


def _digest(pixels, prompt: Prompt, i: int) -> bytes:
  h = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16)
  if prompt.image_sizes is not None:
    h.update(np.asarray(prompt.image_sizes[i]).tobytes())
  return h.digest()


class Engine:
  """Holds the decode state and runs the loop; see the module docstring."""

  def __init__(self, model, params, tokenizer=None, *, layout: Layout, mesh=None,
               rules=(), max_queue: int = 256):
    self.model, self.config, self.params, self.tokenizer = model, model.config, params, tokenizer
    self.layout, self.max_queue = layout, max_queue
    self.prog = P.programs(model.config, model.runtime, mesh, rules, layout)
    self.stats = collections.Counter(dict.fromkeys(
        ("requests", "finished", "cancelled", "rejected", "steps", "slot_steps", "prefill_tokens",
         "cached_tokens", "image_encodes"), 0))
    self._cond = threading.Condition()
    self._waiting: collections.deque = collections.deque()
    self._thread, self._closed = None, False
    self.state = self.table = None
    s = layout.slots
    self.owner: list = [None] * s         # the _Live decoding or prefilling in each slot
    self.held: list = [np.zeros(0, np.int32)] * s   # tokens whose KV each slot's cache holds
    self.held_images: list = [[] for _ in range(s)]
    self.used = [0.0] * s                 # last use, for least-recently-used eviction
    self.prefilling: Optional[_Live] = None

  # --- compile and allocate ---------------------------------------------------------------------

  def _compiled(self, name: str, args):
    done = self.prog.__dict__.setdefault("compiled", {})
    if name not in done:
      t0 = time.perf_counter()
      done[name] = self.prog.jit[name.split("/")[0]].lower(*args).compile()
      self.stats["compile_s"] += time.perf_counter() - t0
    return done[name]

  def warmup(self, log: Optional[Callable[[str], None]] = None) -> dict:
    """Compiles every program (or loads it from the persistent compilation cache) and checks
    that the largest fits the device's memory (UserError, one line, when not) -> name ->
    vlm.compiled.ProgramMemory. `log` gets what was done (the check skipped where the backend
    does not report its memory: the CPU)."""
    from vlm.compiled import ProgramMemory, device_bytes, gib
    say = log or (lambda m: None)
    t0 = time.perf_counter()
    mem = {name: ProgramMemory.of(self._compiled(name, args))
           for name, args in self.prog.abstract_args(self.params).items()}
    lay = self.layout
    say(f"engine: {len(mem)} programs ready in {time.perf_counter() - t0:.1f} s ({lay.slots} "
        f"slots x {lay.cache_len} tokens, KV cache {gib(lay.kv_bytes(self.config))} GiB)")
    mesh = self.prog.mesh
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    have = device_bytes(device)
    name, need = max(((n, m.peak) for n, m in mem.items()), key=lambda x: x[1])
    if have is None:
      say(f"engine: memory check skipped (the {device.platform} backend does not report its "
          f"memory); the largest program ({name}) needs {gib(need)} GiB per device")
    elif need > have:
      raise UserError(f"--kv-cache: {lay.slots} slots x {lay.cache_len} tokens do not fit: the "
                      f"{name} program needs {gib(need)} GiB per device (KV cache "
                      f"{gib(lay.kv_bytes(self.config))} GiB in all), {device.device_kind} has "
                      f"{gib(have)} GiB; lower --kv-cache or --slots")
    else:
      say(f"engine: the largest program ({name}) needs {gib(need)} GiB of the device's "
          f"{gib(have)} GiB")
    return mem

  def _ensure_state(self):
    if self.state is None:
      self.state = self.prog.jit["init"]()
      t = self.prog.table_shape(self.params)
      self.table = jax.numpy.zeros(t.shape, t.dtype)
      self.owner = [None] * self.layout.slots
      self.held = [np.zeros(0, np.int32)] * self.layout.slots
      self.held_images = [[] for _ in range(self.layout.slots)]

  # --- requests ---------------------------------------------------------------------------------

  def check(self, req: Request) -> _Live:
    """What submit() refuses, checked on the caller's thread."""
    p, lay = req.params, self.layout
    try:
      p.validate(self.config.llm.vocab_size)
    except SamplingError as e:
      raise RequestError(str(e), e.field) from None
    n = len(req.prompt.ids)
    if n < 1:
      raise RequestError("the prompt is empty", "messages")
    if n + p.max_tokens > lay.cache_len:
      raise RequestError(f"the prompt ({n} tokens) plus max_tokens ({p.max_tokens}) exceeds "
                         f"the {lay.cache_len} tokens a slot of this engine holds", "max_tokens")
    if p.stop and self.tokenizer is None:
      raise RequestError("stop strings need a tokenizer", "stop")
    pixels = req.prompt.pixels
    if pixels is not None and self.config.vision is None:
      raise RequestError("this model is text-only; it cannot take images", "messages")
    if pixels is not None and len(pixels) > lay.max_images:
      raise RequestError(f"{len(pixels)} images; this engine takes at most {lay.max_images}",
                         "messages")
    stops = p.stop_token_ids
    if stops is None:
      stops = ()
      if self.tokenizer is not None:
        from data.conversation import stop_token_ids
        stops = stop_token_ids(self.tokenizer, self.config.template)
    return _Live(req, stops, self.tokenizer, self.config.image_token_id)

  def submit(self, req: Request) -> None:
    live = self.check(req)
    with self._cond:
      if self._closed:   # nothing would ever serve it: refuse instead of a request that hangs
        raise QueueFull("the server is shutting down; retry later")
      if len(self._waiting) >= self.max_queue:
        self.stats["rejected"] += 1
        raise QueueFull(f"server busy: {len(self._waiting)} requests are already waiting "
                        f"(queue bound {self.max_queue}); retry later")
      self._waiting.append(live)
      self.stats["requests"] += 1
      self._cond.notify()

  def waiting(self) -> int:
    return len(self._waiting)

  def running(self) -> int:
    return sum(o is not None for o in self.owner)

  def start(self) -> "Engine":
    """Runs the loop on a daemon thread until close()."""
    self._ensure_state()
    self._thread = threading.Thread(target=self._serve, name="serve-engine", daemon=True)
    self._thread.start()
    return self

  def close(self, timeout: Optional[float] = 5.0) -> None:
    with self._cond:
      self._closed = True
      for live in self._waiting:
        live.req.on_event(Event(error="the server is shutting down"))
      self._waiting.clear()
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  def run(self, requests: Iterable[Request]) -> None:
    """Runs `requests` to the end on the caller's thread (no loop thread may be running),
    taking them from the iterable as slots free up; their events arrive as they happen."""
    assert self._thread is None, "run() on an engine whose loop thread is running"
    self._ensure_state()
    todo = iter(requests)
    more = True
    while True:
      while more and len(self._waiting) < self.layout.slots:
        nxt = next(todo, None)
        if nxt is None:
          more = False
        else:
          self.submit(nxt)
      if not self.step() and not more:
        return

  def _serve(self) -> None:
    while True:
      with self._cond:
        while not self._closed and not self._waiting and not self._busy():
          self._cond.wait()
        if self._closed:
          return
      self.step()

  # --- the loop ---------------------------------------------------------------------------------

  def _busy(self) -> bool:
    return any(o is not None for o in self.owner)

  def step(self) -> bool:
    """One tick of the loop: cancelled requests reaped, the oldest waiting one admitted to a
    free slot, one prefill chunk (or image encode), one generate step -> whether work remains.
    start() and run() call it; a test may drive it to control arrivals."""
    self._ensure_state()
    try:
      self._reap()
      self._admit()
      if self.prefilling is not None:
        self._prefill()
      if any(o is not None and o is not self.prefilling for o in self.owner):
        self._generate()
    except Exception as e:  # noqa: BLE001 - reported to every request in flight
      log.exception("the engine failed; its requests end with an error")
      for live in [o for o in self.owner if o is not None]:
        live.req.error = f"generation failed: {type(e).__name__}: {e}"[:300]
        live.req.on_event(Event(error=live.req.error))
      self.state = None
      self.prefilling = None
      self._ensure_state()
    return bool(self._waiting) or self._busy()

  def _reap(self) -> None:
    """Requests whose client left: waiting ones dropped, running ones finished as cancelled."""
    with self._cond:
      for live in [w for w in self._waiting if w.req.cancelled]:
        self._waiting.remove(live)
        self.stats["cancelled"] += 1
    for live in self.owner:
      if live is not None and live.req.cancelled:
        self.stats["cancelled"] += 1
        self._finish(live, "cancelled")

  def _reuse(self, slot: int, live: _Live) -> int:
    """Prompt tokens `slot`'s cache already holds for `live`: the common prefix of the tokens,
    cut before the first image that is not the same image."""
    held, ids = self.held[slot], live.ids
    n = min(len(held), len(ids))
    same = np.flatnonzero(held[:n] != ids[:n])
    n = int(same[0]) if len(same) else n
    mine = set(self.held_images[slot])
    for first, count, digest in live.images:
      if first < n and (first, count, digest) not in mine:
        n = first
        break
    return n

  def _claim(self, slot: int, live: _Live) -> tuple:
    """How much `live` wants `slot`: a slot most of whose tokens start `live`'s prompt (its
    conversation so far), the more the better; else the least recently used (a system prompt
    in common does not take another conversation's slot)."""
    reuse = self._reuse(slot, live)
    mine = reuse > 0 and 2 * reuse > len(self.held[slot])
    return mine, reuse if mine else 0, -self.used[slot]

  def _admit(self) -> None:
    """The oldest waiting request into the free slot it claims most (`_claim`), once no other
    request is prefilling."""
    if self.prefilling is not None:
      return
    with self._cond:
      if not self._waiting:
        return
      free = [s for s in range(self.layout.slots) if self.owner[s] is None]
      if not free:
        return
      live = self._waiting.popleft()
    slot = max(free, key=lambda s: self._claim(s, live))
    reuse = min(self._reuse(slot, live), len(live.ids) - 1)
    live.slot, live.pos, live.cached = slot, reuse, reuse
    self.owner[slot], self.prefilling = live, live
    self.held[slot] = live.ids[:reuse]
    self.held_images[slot] = [im for im in self.held_images[slot] if im[0] < reuse]
    self.stats["cached_tokens"] += reuse
    # the chunks: the largest until the tail, which takes the smallest that holds it; a chunk
    # that would run past the cache starts earlier (recomputing tokens it already holds)
    chunks, cols = self.layout.chunks, self.layout.columns
    pos, n, plan = reuse, len(live.ids), []
    while pos < n:
      t = next((c for c in chunks if c >= n - pos), chunks[-1])
      start = min(pos, cols - t)
      plan.append((start, t, min(t, n - start)))
      pos = start + min(t, n - start)
    live.plan = plan
    lo = min(s for s, _, _ in plan)
    ends = np.cumsum([c for _, c, _ in live.images]).astype(int)
    where = np.flatnonzero(live.ids == self.config.image_token_id)
    live.encode = [i for i, e in enumerate(ends) if len(where) and where[e - 1] >= lo]

  def _prefill(self) -> None:
    live = self.prefilling
    if live.encode:   # images first, one per step
      i = live.encode.pop(0)
      px = live.req.prompt.pixels[i][None, None]
      sizes = (None if live.req.prompt.image_sizes is None
               else np.asarray(live.req.prompt.image_sizes[i], np.int32)[None, None])
      args = (self.params, self.table, np.int32(i), px, sizes)
      name = "encode" if px.dtype == np.uint8 else f"encode/{px.dtype}"
      self.table = self._compiled(name, args)(*args)
      self.stats["image_encodes"] += 1
      return
    start, t, n = live.plan.pop(0)
    ids = np.zeros((1, t), np.int32)
    ids[0, :n] = live.ids[start:start + n]
    counts = np.zeros(self.table.shape[0], np.int32)
    counts[:len(live.images)] = [c for _, c, _ in live.images]
    first = np.int32((live.ids[:start] == self.config.image_token_id).sum())
    args = (self.params, self.state, self.table, counts, np.int32(live.slot), ids,
            np.int32(start), np.int32(n), first)
    self.state = self._compiled(f"prefill/{t}", args)(*args)
    self.stats["prefill_tokens"] += n
    live.pos = start + n
    self.held[live.slot] = live.ids[:live.pos]
    self.held_images[live.slot] = [im for im in live.images if im[0] < live.pos]
    if not live.plan:
      args = (self.state, np.int32(live.slot), row(live.p))
      self.state = self._compiled("insert", args)(*args)
      self.prefilling = None

  def _generate(self) -> None:
    active = np.array([o is not None and o is not self.prefilling for o in self.owner])
    want = any(o.p.logprobs for o in self.owner if o is not None)
    args = (self.params, self.state, active, np.bool_(want))
    self.state, out = self._compiled("generate", args)(*args)
    tok, lp, top_ids, top_lp = jax.device_get(out if want else out[:1] + (None,) * 3)
    self.stats["steps"] += 1
    self.stats["slot_steps"] += int(active.sum())
    now = time.monotonic()
    for s in np.flatnonzero(active):
      live, t = self.owner[s], int(tok[s])
      self.held[s] = np.append(self.held[s], np.int32(t))
      self.used[s] = now
      live.n += 1
      if live.n == 1:
        live.req.t_first = time.perf_counter()
      if t in live.stops:
        self._finish(live, "stop")
        continue
      if live.p.logprobs:
        k = live.p.top_logprobs
        live.logprobs.append(TokenLogprob(t, float(lp[s]), tuple(
            (int(i), float(v)) for i, v in zip(top_ids[s, :k], top_lp[s, :k]))))
      final = live.n >= live.p.max_tokens
      self._emit(live, *live.text.push(t, final))
      if live.text.closed:
        self._finish(live, "stop" if live.text.stopped else "length")

  def _emit(self, live: _Live, delta: str, new: int) -> None:
    if not delta and not new:
      return
    k = live.text.released
    toks = tuple(live.text.tokens[k - new:k])
    lps = tuple(live.logprobs[k - new:k]) if live.p.logprobs else ()
    live.req.on_event(Event(text=delta, tokens=toks, logprobs=lps))

  def _finish(self, live: _Live, reason: str) -> None:
    if not live.text.closed:
      self._emit(live, *live.text.push(None, True))
    n = len(live.text.tokens)
    gen = Generation(np.asarray(live.text.tokens, np.int32), live.text.text, reason,
                     live.logprobs[:n] if live.p.logprobs else None, len(live.ids), live.cached)
    live.req.result, live.req.t_done = gen, time.perf_counter()
    if self.prefilling is live:
      self.prefilling = None
    self.owner[live.slot] = None
    self.stats["finished"] += 1
    live.req.on_event(Event(done=gen))
