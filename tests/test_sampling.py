"""serve/sampling.py: the decode step's per-row sampler against a numpy transcription of the rules
(OpenAI's penalties, logit_bias, temperature, top-k, top-p, exact argmax when greedy, logprobs of
the raw distribution), and SamplingParams.validate naming each field and its range."""
import jax
import numpy as np
import pytest

from serve import sampling
from serve.sampling import SamplingError, SamplingParams

V = 40


def np_processed(logits, counts, p: SamplingParams):
  """The rules as OpenAI / vLLM state them, in numpy."""
  x = logits - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
  for t, b in p.logit_bias.items():
    x[t] += b
  if p.temperature == 0:
    return x
  x = x / p.temperature
  keep = np.ones(len(x), bool)
  if p.top_k:
    keep &= x >= np.sort(x)[::-1][p.top_k - 1]
  if p.top_p < 1:
    desc = np.sort(x[keep])[::-1]
    probs = np.exp(desc - desc.max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs          # mass of the tokens ranked above each one
    n = max(1, int((before < p.top_p).sum()))  # the smallest set reaching top_p
    keep &= x >= desc[n - 1]
  return np.where(keep, x, -np.inf)


def device_rows(params):
  rows = sampling.rows(len(params))
  for i, p in enumerate(params):
    for k, v in sampling.row(p).items():
      rows[k][i] = v
  return rows


PARAMS = [SamplingParams(),
          SamplingParams(presence_penalty=1.5, frequency_penalty=0.7, logit_bias={3: 5.0, 7: -100}),
          SamplingParams(temperature=0.7, top_k=5, seed=1),
          SamplingParams(temperature=1.3, top_p=0.6, seed=2, frequency_penalty=-1.0),
          SamplingParams(temperature=0.5, top_k=9, top_p=0.8, presence_penalty=-0.5, seed=3,
                         logit_bias={0: 2.0}),
          SamplingParams(temperature=1.0, seed=4)]


def test_rows_follow_the_numpy_rules():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(len(PARAMS), V)).astype(np.float32) * 3
  counts = rng.integers(0, 3, size=(len(PARAMS), V)).astype(np.int32) * (rng.random((1, V)) < .3)
  rows = device_rows(PARAMS)
  got = np.asarray(jax.jit(sampling.processed)(logits, counts, rows))
  steps = np.zeros(len(PARAMS), np.int32)
  tok, lp, top_ids, top_lp = map(np.asarray, jax.jit(sampling.sample)(
      logits, counts, rows, steps, top_logprobs=True))
  raw = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  for i, p in enumerate(PARAMS):
    want = np_processed(logits[i].astype(np.float64), counts[i], p)
    np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want), err_msg=str(p))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[i][ok], want[ok], rtol=1e-5, atol=1e-5)
    if p.greedy:
      assert tok[i] == np.argmax(want)           # exact argmax, penalties and bias applied
    else:
      assert np.isfinite(want[tok[i]])           # drawn from the kept set
    # logprobs: the model's own distribution, before penalties, bias and temperature
    assert abs(lp[i] - raw[i, tok[i]]) < 1e-5
    np.testing.assert_array_equal(top_ids[i], np.argsort(-raw[i], kind="stable")[:20])
    np.testing.assert_allclose(top_lp[i], np.sort(raw[i])[::-1][:20], atol=1e-5)
  _, _, none, _ = jax.jit(sampling.sample)(logits, counts, rows, steps, top_logprobs=False)
  assert not np.asarray(none).any()   # no row asked: the top-20 are not computed


def test_draws_follow_the_kept_distribution():
  """Many rows, one parameter set, each with its own seed: the frequencies are the softmax of
  the numpy-processed logits; the same seed and step draw the same token."""
  logits = np.log(np.float32([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  counts = np.int32([0, 2, 0, 0, 1, 0])
  n = 8000
  for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=2.0, top_k=4),
            SamplingParams(temperature=0.8, top_p=0.7, presence_penalty=0.3,
                           frequency_penalty=0.2)):
    rows = device_rows([p.replace(seed=s) for s in range(n)])
    tok = np.asarray(jax.jit(sampling.sample)(np.tile(logits, (n, 1)), np.tile(counts, (n, 1)),
                                              rows, np.zeros(n, np.int32),
                                              top_logprobs=False)[0])
    want = np_processed(logits.astype(np.float64), counts, p)
    want = np.exp(want - want.max())
    np.testing.assert_allclose(np.bincount(tok, minlength=6) / n, want / want.sum(), atol=0.02,
                               err_msg=str(p))
    again = np.asarray(jax.jit(sampling.sample)(np.tile(logits, (n, 1)), np.tile(counts, (n, 1)),
                                                rows, np.zeros(n, np.int32),
                                                top_logprobs=False)[0])
    np.testing.assert_array_equal(tok, again)


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -1.0, "[0.0, inf)"), ("temperature", float("nan"), "a number"),
    ("top_p", 0.0, "(0.0, 1.0]"), ("top_p", 1.5, "(0.0, 1.0]"), ("top_k", -1, "[0, inf)"),
    ("top_k", 2.5, "an integer"), ("presence_penalty", 2.5, "[-2.0, 2.0]"),
    ("frequency_penalty", -3, "[-2.0, 2.0]"), ("top_logprobs", 21, "[0, 20]"),
    ("max_tokens", 0, "[1, inf)"), ("seed", 2**64, "[-9223372036854775808"),
    ("logit_bias", {1: 101}, "[-100, 100]"), ("logit_bias", {-1: 1}, "token ids"),
    ("logit_bias", {i: 1 for i in range(301)}, "at most 300"), ("stop", ("",), "non-empty"),
    ("logprobs", 1, "true or false"), ("stop_token_ids", (-2,), "token ids")])
def test_validate_names_the_field_and_its_range(field, value, words):
  with pytest.raises(SamplingError) as e:
    SamplingParams(**{field: value}).validate(vocab_size=V)
  assert e.value.field == field and str(e.value).startswith(field) and words in str(e.value)
  with pytest.raises(SamplingError, match="top_logprobs needs logprobs"):
    SamplingParams(top_logprobs=2).validate()
  with pytest.raises(SamplingError, match=r"token ids in \[0, 39\]"):
    SamplingParams(logit_bias={40: 1.0}).validate(vocab_size=V)
  assert SamplingParams(temperature=1.5, seed=-5, logit_bias={39: -100}, logprobs=True,
                        top_logprobs=20).validate(vocab_size=V)


def test_chat_refuses_a_negative_temperature_in_one_line(tmp_path, capsys):
  """#24.1: a bad sampling flag is one line, before any model is looked at."""
  from serve import chat
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(tmp_path / "none"), "--temperature", "-1", "hi"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.strip() == \
      "error: --temperature: must be in [0.0, inf), got -1.0", err
