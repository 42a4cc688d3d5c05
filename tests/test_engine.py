"""serve/engine.py: under random arrivals, prompt lengths, max_tokens, cancellations, text and image
rows and several slot counts, every greedy row equals, token for token, an independent plain
greedy loop over full forwards (tests/greedy.py); a conversation's next turn reuses the slot
that holds its earlier turns (no image encode, only the new tokens prefilled) and answers as a
fresh run does."""
import numpy as np
import pytest

from data.conversation import stop_token_ids
from serve.engine import Engine, Request
from serve.generate import Generator
from serve.prompt import build_prompt
from serve.sampling import SamplingParams
from tests.greedy import greedy_tokens, loaded
from tests.tiny_ckpt import shared_llava_checkpoint

QUESTIONS = ["What is shown?", "Describe the image in detail please.", "Any fracture?",
             "Is the lesion on the left or on the right side of the patient?", "Size?"]


@pytest.fixture(scope="module")
def gen():
  return Generator.from_checkpoint(shared_llava_checkpoint())


def oracle(prompt, max_tokens, stops):
  model, params, _ = loaded(shared_llava_checkpoint())   # stacked, as saved: not the engine's
  return greedy_tokens(model, params, prompt, max_tokens, stops)


def drive(engine, arrivals, rng):
  """Submits each request at its arrival step, cancels a request after its `cancel_after`-th
  event, ticks the engine until all are done."""
  step, pending = 0, sorted(arrivals, key=lambda a: a[0])
  while pending or engine.step():
    while pending and pending[0][0] <= step:
      engine.submit(pending.pop(0)[1])
    step += 1
    assert step < 2000


def random_requests(gen, rng, n):
  img = [rng.integers(0, 256, (40 + 10 * i, 30, 3), dtype=np.uint8) for i in range(2)]
  out = []
  for i in range(n):
    images = [img[i % 2]] if rng.random() < 0.5 else []
    prompt = build_prompt(gen.config, gen.tokenizer, QUESTIONS[rng.integers(len(QUESTIONS))],
                          images)
    room = gen.config.llm.max_positions - len(prompt.ids)
    params = SamplingParams(max_tokens=int(rng.integers(1, min(room, 24) + 1)),
                            stop_token_ids=() if rng.random() < 0.3 else None)
    req = Request(prompt, params)
    events = []
    req.on_event = events.append
    cancel_after = int(rng.integers(1, 4)) if rng.random() < 0.2 else None
    if cancel_after:
      def on_event(e, req=req, events=events, k=cancel_after):
        events.append(e)
        if len(events) >= k:
          req.cancel()
      req.on_event = on_event
    out.append((int(rng.integers(0, 30)), req, events, cancel_after))
  return out


def check(gen, reqs):
  stops = stop_token_ids(gen.tokenizer, gen.config.template)
  for _, req, events, cancel_after in reqs:
    p = req.params
    want = oracle(req.prompt, p.max_tokens, stops if p.stop_token_ids is None else ())
    res = req.result
    assert res is not None and events[-1].done is res
    if cancel_after and res.finish_reason == "cancelled":
      np.testing.assert_array_equal(res.tokens, want[:len(res.tokens)])
      continue
    np.testing.assert_array_equal(res.tokens, want)
    assert res.finish_reason == ("length" if len(want) == p.max_tokens else "stop")
    assert "".join(e.text for e in events) == res.text
    assert [t for e in events for t in e.tokens] == list(res.tokens)


def run_random(gen, slots, n, seed):
  rng = np.random.default_rng(seed)
  engine = gen.engine(gen.context_layout(slots))
  reqs = random_requests(gen, rng, n)
  drive(engine, [(a, r) for a, r, _, _ in reqs], rng)
  check(gen, reqs)
  assert all(o is None for o in engine.owner)
  return engine


def test_random_arrivals_equal_the_plain_greedy_loop(gen):
  engine = run_random(gen, 4, 10, seed=0)
  s = engine.stats
  assert s["slot_steps"] > s["steps"]       # steps were shared by several requests


@pytest.mark.slow   # ~1 min: three more engine shapes to compile
@pytest.mark.parametrize("slots", [1, 3, 8])
def test_random_arrivals_other_slot_counts(gen, slots):
  run_random(gen, slots, 16, seed=slots)


def test_a_follow_up_turn_reuses_the_slot(gen):
  """Turn 2 of a conversation: no image encode, only the tokens after the common prefix
  prefilled, the answer equal to the oracle's; a conversation on another image in between does
  not take its slot (least recently used goes first)."""
  engine = gen.engine(gen.context_layout(4))
  rng = np.random.default_rng(7)
  img, other = (rng.integers(0, 256, (50, 40, 3), dtype=np.uint8) for _ in range(2))
  stops = stop_token_ids(gen.tokenizer, gen.config.template)
  params = SamplingParams(max_tokens=10)

  def ask(question, image, history=()):
    prompt = build_prompt(gen.config, gen.tokenizer, question, [image], history=history)
    req = Request(prompt, params)
    before = dict(engine.stats)
    engine.run([req])
    assert list(req.result.tokens) == oracle(prompt, 10, stops)
    return req.result, prompt, {k: engine.stats[k] - before.get(k, 0) for k in engine.stats}

  first, p1, d1 = ask("What is shown?", img)
  assert d1["image_encodes"] == 1
  ask("Describe it.", other)                        # another conversation in between
  second, p2, d2 = ask("And the left side?", img, history=[("What is shown?", first.text)])
  # the slot holds turn 1, its answer and the stop token that ended it (fed like any other)
  held = len(p1.ids) + len(first.tokens) + (first.finish_reason == "stop")
  assert d2["image_encodes"] == 0 and second.cached_tokens >= len(p1.ids)
  assert second.cached_tokens <= held and d2["prefill_tokens"] == len(p2.ids) - second.cached_tokens
  # the same turn on a fresh engine (nothing to reuse) prefills it all and answers the same
  fresh = Engine(gen.model, gen.params, gen.tokenizer, layout=engine.layout, mesh=gen.mesh,
                 rules=gen.rules)                   # the same programs, an empty cache
  req = Request(p2, params)
  fresh.run([req])
  np.testing.assert_array_equal(req.result.tokens, second.tokens)
  assert fresh.stats["image_encodes"] == 1 and fresh.stats["prefill_tokens"] == len(p2.ids)


def test_warmup_compiles_every_program_and_checks_the_kv_cache(gen, monkeypatch):
  """#23.6: start-up compiles what the engine runs and checks the largest program against the
  device's memory (skipped, and said so, on the CPU); a setting that does not fit is one line.
  `programs.lowered` gives the same programs from abstract params (compile-for-target)."""
  import jax
  from data.errors import UserError
  from serve import programs
  from vlm import compiled
  engine = gen.engine(gen.context_layout(4))
  said = []
  mem = engine.warmup(log=said.append)
  names = {"generate", "insert", "encode"} | {f"prefill/{t}" for t in engine.layout.chunks}
  assert set(mem) == names and all(m.peak > 0 for m in mem.values())
  assert any("memory check skipped (the cpu backend" in m for m in said), said
  monkeypatch.setattr(compiled, "device_bytes", lambda device: 1000)
  with pytest.raises(UserError, match=r"--kv-cache: 4 slots x 128 tokens do not fit: the \S+ "
                     r"program needs .* GiB per device .* has 0.00 GiB; lower --kv-cache"):
    engine.warmup()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), gen.params)
  lowered = programs.lowered(gen.config, gen.model.runtime, engine.layout, abstract,
                             rules=gen.rules)
  assert set(lowered) == names


def test_kv_cache_flag(gen):
  import argparse
  from data.errors import UserError
  from serve.generate import layout_from_args
  per_token = 2 * 2 * 2 * 8 * 4      # k and v, 2 layers, 2 kv heads of 8, float32
  lay = lambda kv, slots=4: layout_from_args(argparse.Namespace(slots=slots, kv_cache=kv),
                                             gen.config, gen.cache_dtype)
  assert lay("1000").cache_len == 1000 // 4 - 1
  assert lay(f"{per_token * 400 / 2**10}KiB").cache_len == 99
  assert lay(None).cache_len == gen.config.llm.max_positions
  for bad, words in (("12", "leaves 2 tokens per slot"), ("lots", "give tokens"),
                     ("1.5", "whole number"), ("3 parsecs", "give tokens")):
    with pytest.raises(UserError, match=words):
      lay(bad)
  with pytest.raises(UserError, match="--slots must be at least 1"):
    lay("1000", 0)


def test_a_closed_engine_refuses_requests(gen):
  """A request sent to an engine whose loop was closed is refused at once (the server's 503),
  never queued where nothing serves it."""
  from serve.engine import QueueFull
  engine = Engine(gen.model, gen.params, gen.tokenizer, layout=gen.context_layout(1),
                  mesh=gen.mesh, rules=gen.rules)
  engine.close()
  prompt = build_prompt(gen.config, gen.tokenizer, "What is shown?", [])
  with pytest.raises(QueueFull, match="shutting down"):
    engine.submit(Request(prompt, SamplingParams(max_tokens=2)))
  assert engine.waiting() == 0
