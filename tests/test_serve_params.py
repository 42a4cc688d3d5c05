"""Issue 23's parameter table as a test: every entry of serve.api.TABLE is either honoured, with its
effect checked against an independent reference (the model's own logits from a plain
`model.apply` forward, numpy transcriptions of OpenAI's penalty rule, the tokenizer's own
decoding), or refused with a 400 that names it. Requests go through the `openai` client to the
shared tiny-model server (tests/serve_fixture.py)."""
import functools
import logging
from collections import Counter

import jax
import numpy as np
import openai
import pytest

from serve import api
from tests.serve_fixture import LIMITS, MODEL, shared_server
from tests.tiny_ckpt import shared_llava_checkpoint

Q = "Is the heart enlarged?"
MSGS = [{"role": "user", "content": Q}]

# Refused parameters: a value the server cannot honour (where a default-only value is accepted,
# that value is checked in test_default_only_values_are_accepted).
REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto", "parallel_tool_calls": True,
    "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
    "response_format": {"type": "json_object"}, "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {},
    "metadata": {"k": "v"}, "store": True, "service_tier": "flex",
    "prompt_cache_retention": "24h",
}
DEFAULT_ONLY = {"response_format": {"type": "text"}, "modalities": ["text"],
                "service_tier": "auto", "store": False, "prompt_cache_retention": "in_memory"}
# Out-of-range values of honoured parameters: each a 400 naming the parameter.
OUT_OF_RANGE = {
    "temperature": 2.5, "top_p": 0, "top_k": -2, "max_tokens": 0, "max_completion_tokens": 0,
    "n": api.MAX_N + 1, "seed": 2**64, "stop": [""] * 5, "logprobs": "yes",
    "top_logprobs": 21, "presence_penalty": 2.1, "frequency_penalty": -3,
    "logit_bias": {"5": 101}, "stream": "yes", "stream_options": {"include_usage": True},
    "ignore_eos": 1, "user": 7, "safety_identifier": ["x"], "prompt_cache_key": {},
}
# Honoured parameters whose effect a test below checks (test name in the comment).
EFFECT = {
    "model": "wrong model name -> 404 (test_model_and_messages)",
    "messages": "test_model_and_messages",
    "temperature": "test_logprobs_are_the_models_own / test_seeds",
    "top_p": "test_top_k_and_top_p_narrow_to_greedy", "top_k": "same",
    "max_tokens": "test_max_tokens_and_ignore_eos", "max_completion_tokens": "same",
    "ignore_eos": "same", "seed": "test_seeds", "n": "test_n_choices",
    "stop": "test_usage_counts_what_is_returned", "stream": "test_streamed_logprobs",
    "stream_options": "test_streamed_logprobs", "logprobs": "test_logprobs_are_the_models_own",
    "top_logprobs": "same", "presence_penalty": "test_penalties_follow_the_numpy_rule",
    "frequency_penalty": "same", "logit_bias": "test_logit_bias",
    "user": "test_identifiers_are_logged", "safety_identifier": "same",
    "prompt_cache_key": "same",
}


@pytest.fixture(scope="module")
def srv():
  return shared_server()


@pytest.fixture(scope="module")
def client(srv):
  return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


@functools.lru_cache(maxsize=None)
def reference():
  """The checkpoint's model, params and tokenizer, and a jitted log-softmax forward over a fixed
  128-token window (causal: the padding after a prefix does not change its logits)."""
  import vlm
  from data.tokenizer import load_tokenizer
  from serve.prompt import build_prompt
  ckpt = shared_llava_checkpoint()
  model, params = vlm.from_pretrained(ckpt)
  tok = load_tokenizer(ckpt)
  fwd = jax.jit(lambda p, ids: jax.nn.log_softmax(model.apply({"params": p}, ids), axis=-1))
  prompt = list(build_prompt(model.config, tok, Q, []).ids)
  return fwd, params, tok, prompt


def next_logprobs(ids) -> np.ndarray:
  fwd, params, _, _ = reference()
  window = np.zeros((1, model_context()), np.int32)
  window[0, :len(ids)] = ids
  return np.asarray(fwd(params, window))[0, len(ids) - 1]


def model_context() -> int:
  return 128


def greedy(n: int, *, presence=0.0, frequency=0.0, bias=None) -> list:
  """OpenAI's rule in numpy: logits[t] -= presence * (count[t] > 0) + frequency * count[t],
  logits[t] += bias[t], then argmax (log-softmax shifts every logit equally)."""
  _, _, _, prompt = reference()
  out = []
  for _ in range(n):
    lp = next_logprobs(prompt + out).astype(np.float64)
    counts = Counter(out)
    for t, c in counts.items():
      lp[t] -= presence + frequency * c
    for t, b in (bias or {}).items():
      lp[t] += b
    out.append(int(np.argmax(lp)))
  return out


def decode(ids) -> str:
  return reference()[2].decode(ids, skip_special_tokens=True).strip()


def ask(client, **kw):
  kw = {"model": MODEL, "messages": MSGS, "temperature": 0, **kw}
  extra = {k: kw.pop(k) for k in ("top_k", "ignore_eos") if k in kw}
  return client.chat.completions.create(**kw, extra_body=extra or None)


def test_the_table_is_covered():
  """Every TABLE entry is tested here: refused, or honoured with a range and an effect check."""
  assert set(api.TABLE) == set(EFFECT) | set(REFUSED), set(api.TABLE) ^ (set(EFFECT)
                                                                         | set(REFUSED))
  assert not set(EFFECT) & set(REFUSED)
  assert set(OUT_OF_RANGE) == set(EFFECT) - {"model", "messages"}


def test_refused_and_out_of_range_get_a_400_naming_the_parameter(client):
  cases = [(k, v, "not supported") for k, v in REFUSED.items()]
  cases += [(k, v, "") for k, v in OUT_OF_RANGE.items()]
  cases += [("best_of", 2, "not supported"), ("guided_json", {}, "not supported")]  # unknown
  for name, value, words in cases:
    body = {"stream": True} if name == "stream_options" and value is None else {}
    with pytest.raises(openai.BadRequestError) as e:
      client.chat.completions.create(model=MODEL, messages=MSGS, extra_body={name: value, **body})
    err = e.value.body
    assert err["param"] == name and name in err["message"] and words in err["message"], (name, err)
  with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
    client.chat.completions.create(model=MODEL, messages=MSGS, top_logprobs=2)
  with pytest.raises(openai.BadRequestError, match="vocabulary size"):
    client.chat.completions.create(model=MODEL, messages=MSGS, logit_bias={"99999": 5})


def test_default_only_values_are_accepted(client):
  want = ask(client, max_tokens=4).choices[0].message.content
  for name, value in DEFAULT_ONLY.items():
    got = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=4,
                                         extra_body={name: value})
    assert got.choices[0].message.content == want, name


def test_model_and_messages(client):
  with pytest.raises(openai.NotFoundError, match="not served here"):
    client.chat.completions.create(model="gpt-4o", messages=MSGS)
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x",
                                                           "name": "bob"}])
  assert e.value.body["param"] == "messages[0].name"


def test_logprobs_are_the_models_own(client):
  """Greedy answer, its logprobs and top_logprobs = log_softmax of an independent forward."""
  n = 8
  want = greedy(n)
  out = ask(client, max_tokens=n, ignore_eos=True, logprobs=True, top_logprobs=5)
  content = out.choices[0].logprobs.content
  assert len(content) == n == out.usage.completion_tokens
  _, _, tok, prompt = reference()
  for k, (entry, t) in enumerate(zip(content, want)):
    lp = next_logprobs(prompt + want[:k])
    assert entry.token == tok.decode([t]), k
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    np.testing.assert_allclose(entry.logprob, lp[t], atol=2e-4)
    top = np.sort(lp)[::-1][:5]
    np.testing.assert_allclose([x.logprob for x in entry.top_logprobs], top, atol=2e-4)
    assert entry.top_logprobs[0].token == entry.token
  assert out.choices[0].message.content == decode(want)
  assert ask(client, max_tokens=2).choices[0].logprobs is None     # not asked: null


def test_streamed_logprobs(client):
  """Each chunk's choice carries the logprobs of the tokens its text covers; they add up to the
  unstreamed answer's, and include_usage adds the usage chunk."""
  plain = ask(client, max_tokens=10, logprobs=True, top_logprobs=2)
  stream = ask(client, max_tokens=10, logprobs=True, top_logprobs=2, stream=True,
               stream_options={"include_usage": True})
  chunks = list(stream)
  entries = [e for c in chunks if c.choices and c.choices[0].logprobs
             for e in c.choices[0].logprobs.content]
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == plain.choices[0].message.content
  want = plain.choices[0].logprobs.content
  assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in entries] == [
      (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in want]
  np.testing.assert_allclose([[e.logprob] + [t.logprob for t in e.top_logprobs] for e in entries],
                             [[e.logprob] + [t.logprob for t in e.top_logprobs] for e in want],
                             atol=1e-5)   # another batch of rows: float noise only
  assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == len(entries)
  assert all(c.usage is None for c in chunks[:-1])


def test_logit_bias(client):
  forced = greedy(1)[0] + 1
  out = ask(client, max_tokens=4, ignore_eos=True, logit_bias={str(forced): 100}, logprobs=True)
  assert decode([forced] * 4) == out.choices[0].message.content
  first = greedy(1)[0]
  want = greedy(3, bias={first: -100})
  out = ask(client, max_tokens=3, ignore_eos=True, logit_bias={str(first): -100})
  assert out.choices[0].message.content == decode(want) and want[0] != first


def test_penalties_follow_the_numpy_rule(client):
  n = 12
  plain = greedy(n)
  want = greedy(n, presence=0.5, frequency=1.5)
  assert want != plain        # the penalty changes the answer (else the test proves nothing)
  out = ask(client, max_tokens=n, ignore_eos=True, presence_penalty=0.5, frequency_penalty=1.5)
  assert out.choices[0].message.content == decode(want)


def test_max_tokens_and_ignore_eos(client):
  for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
    out = ask(client, ignore_eos=True, **kw)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == decode(greedy(5))


def test_top_k_and_top_p_narrow_to_greedy(client):
  """temperature 2 with top_k 1, or with a top_p below the top token's probability, leaves one
  candidate: the greedy answer, whatever the seed."""
  want = decode(greedy(6))
  for kw in ({"top_k": 1}, {"top_p": 1e-6}):
    for seed in (1, 2):
      out = ask(client, max_tokens=6, ignore_eos=True, temperature=2.0, seed=seed, **kw)
      assert out.choices[0].message.content == want, kw


def test_seeds(client):
  """A seed reproduces; without one every request draws its own (issue 23: no silent
  duplicates)."""
  kw = dict(max_tokens=16, ignore_eos=True, temperature=1.5)
  a, b = (ask(client, seed=7, **kw).choices[0].message.content for _ in range(2))
  assert a == b
  fresh = {ask(client, **kw).choices[0].message.content for _ in range(3)}
  assert len(fresh) == 3


def test_n_choices(client):
  """n rows of the engine: choice i samples with seed + i (choice 0 is the n=1 answer), usage
  sums the choices, a stream interleaves them by index."""
  kw = dict(max_tokens=8, ignore_eos=True, temperature=1.5, seed=11)
  out = ask(client, n=3, **kw)
  assert [c.index for c in out.choices] == [0, 1, 2]
  texts = [c.message.content for c in out.choices]
  assert texts[0] == ask(client, **kw).choices[0].message.content
  assert texts[1] == ask(client, **{**kw, "seed": 12}).choices[0].message.content
  assert len(set(texts)) == 3 and out.usage.completion_tokens == 3 * 8
  chunks = list(ask(client, n=2, stream=True, **kw))
  for i in range(2):
    assert "".join(c.choices[0].delta.content or "" for c in chunks
                   if c.choices and c.choices[0].index == i) == texts[i]
  assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]


def test_usage_counts_what_is_returned(client):
  """An answer cut at a stop string counts (and lists logprobs for) only the tokens it is made
  of, never those of the stop string or past it."""
  full = decode(greedy(LIMITS["max_tokens"]))
  words = full.split()
  assert len(words) >= 3, full
  stop = " " + words[2]
  out = ask(client, max_tokens=LIMITS["max_tokens"], ignore_eos=True, stop=stop, logprobs=True)
  text = out.choices[0].message.content
  assert text == full[:full.index(stop)].strip() and out.choices[0].finish_reason == "stop"
  content = out.choices[0].logprobs.content
  assert out.usage.completion_tokens == len(content) < LIMITS["max_tokens"]
  assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").strip() == text


def test_identifiers_are_logged(client, caplog):
  """user, safety_identifier and prompt_cache_key change nothing in the answer (nor do they at
  OpenAI); the server logs them with the request id."""
  with caplog.at_level(logging.INFO, logger="serve.server"):
    for name in ("user", "safety_identifier", "prompt_cache_key"):
      client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1,
                                     extra_body={name: f"id-{name}"})
  for name in ("user", "safety_identifier", "prompt_cache_key"):
    assert f"{name}=id-{name}" in caplog.text
