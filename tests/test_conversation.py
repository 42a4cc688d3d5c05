"""Templates and loss masks. Expected ids come from the test's own rendering of the DESIGN.md
template strings and from tokenizing the answers on their own, from transcriptions of the reference
code's rules (LLaVA, LLaVA-Med v1.5, Llama3-Med) and from mistral-common's tokenizer, never from
encode()'s output."""
import numpy as np
import pytest

from conversation_data import (A1, A2, IMG_TOKENS, Q1, Q2, VICUNA_SYSTEM, sample,
                               tok2, tok3)  # noqa: F401 - fixtures
from data import conversation as C
from data.errors import BadSample
from tiny_tokenizers import llama3_tokenizer, load


def render(template, q1, system, eos):
  """The full training text, written from DESIGN.md (and LLaVA's conv_vicuna_v1)."""
  if template == "llama3":
    h = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
    t = f"{h('system')}{system}<|eot_id|>" if system else ""
    return t + "".join(f"{h('user')}{q}<|eot_id|>{h('assistant')}{a}<|eot_id|>"
                       for q, a in ((q1, A1), (Q2, A2)))
  if template == "vicuna_v1":
    system = VICUNA_SYSTEM if system is None else system
    return (f"{system} " if system else "") + "".join(
        f"USER: {q} ASSISTANT: {a}{eos}" for q, a in ((q1, A1), (Q2, A2)))
  if template == "mistral_instruct":
    q1 = f"{system}\n\n{q1}" if system else q1
    return "".join(f"[INST] {q} [/INST] {a}{eos}" for q, a in ((q1, A1), (Q2, A2)))
  raise ValueError(template)


def oracle_ids(tok, text, fresh_after=None):
  """BOS + text tokenized in chunks split at <image> (LLaVA's tokenizer_image_token), each image
  expanded to IMG_TOKENS copies of the <image> id. Text after each `fresh_after` string is a new
  tokenizer input (mistral-common encodes every message on its own)."""
  img = tok.convert_tokens_to_ids("<image>")
  ids = [tok.bos_token_id]
  segments = text.split(fresh_after) if fresh_after else [text]
  segments = [s + fresh_after for s in segments[:-1]] + segments[-1:] if fresh_after else segments
  for segment in segments:
    for i, chunk in enumerate(segment.split("<image>")):
      if i:
        ids += [img] * IMG_TOKENS
      if chunk:
        ids += tok(chunk, add_special_tokens=False)["input_ids"]
  return np.array(ids)


def trained_pieces(tok, template):
  """Each answer's trained ids, tokenized on its own, with its end token."""
  enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
  if template == "llama3":
    return [enc(a) + [tok.convert_tokens_to_ids("<|eot_id|>")] for a in (A1, A2)]
  return [enc(" " + a) + [tok.eos_token_id] for a in (A1, A2)]


def expected_labels(ids, pieces):
  """Mark each answer's ids where it first occurs (in order) in the oracle ids."""
  labels, cur = np.full_like(ids, -100), 0
  for p in pieces:
    hit = next(i for i in range(cur, len(ids) - len(p) + 1) if list(ids[i:i + len(p)]) == p)
    labels[hit:hit + len(p)] = p
    cur = hit + len(p)
  return labels


def check(tok, template, image_first, system):
  """The data's placement kept (image_position='keep'); the 'first' rule has its own tests."""
  img = tok.convert_tokens_to_ids("<image>")
  out = C.encode(sample(image_first), tok, template, image_tokens=IMG_TOKENS, image_token_id=img,
                 system=system, image_position="keep")
  q1 = f"<image>\n{Q1}" if image_first else f"{Q1}\n<image>"
  ids = oracle_ids(tok, render(template, q1, system, tok.eos_token),
                   tok.eos_token if template == "mistral_instruct" else None)
  pieces = trained_pieces(tok, template)
  np.testing.assert_array_equal(out["input_ids"], ids)
  np.testing.assert_array_equal(out["labels"], expected_labels(ids, pieces))
  np.testing.assert_array_equal(out["labels"][out["labels"] != -100], sum(pieces, []))
  assert out["input_ids"].dtype == out["labels"].dtype == np.int32
  assert (out["input_ids"] == img).sum() == IMG_TOKENS


@pytest.mark.parametrize("system", [None, "You are a careful radiologist."])
@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("template", ["llama3", "vicuna_v1", "mistral_instruct"])
def test_llama3_tokenizer_trains_answers_only(tok3, template, image_first, system):
  check(tok3, template, image_first, system)


def test_llama3_tokenizer_whole_string(tok3):
  """With <image> a special token, the HF tokenization of the whole prompt (BOS included by the
  tokenizer itself) is the same sequence."""
  img = tok3.convert_tokens_to_ids("<image>")
  text = render("llama3", f"{Q1}\n<image>", "", None)
  ids = tok3(text)["input_ids"]
  k = ids.index(img)
  ids = ids[:k] + [img] * IMG_TOKENS + ids[k + 1:]
  out = C.encode(sample(False), tok3, "llama3", image_tokens=IMG_TOKENS, image_token_id=img)
  assert out["input_ids"].tolist() == ids


@pytest.mark.parametrize("system", [None, ""])
@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct"])
def test_sentencepiece_tokenizer_trains_answers_only(tok2, template, image_first, system):
  """Llama-2 style '▁' handling: no extra '▁' after </s>, answers keep their leading '▁'."""
  check(tok2, template, image_first, system)


@pytest.mark.parametrize("tok", ["tok3", "tok2"])
def test_plain_trains_caption_and_newline(tok, request):
  tok = request.getfixturevalue(tok)
  img = tok.convert_tokens_to_ids("<image>")
  caption = "Chest X-ray showing cardiomegaly."
  s = {"id": "c1", "image": "x.png", "conversations": [
      {"from": "human", "value": "Describe the image.\n<image>"},
      {"from": "gpt", "value": caption}]}
  out = C.encode(s, tok, "plain", image_tokens=IMG_TOKENS, image_token_id=img)
  trained = tok(caption + "\n", add_special_tokens=False)["input_ids"]
  assert out["input_ids"].tolist() == [tok.bos_token_id] + [img] * IMG_TOKENS + trained
  assert out["labels"].tolist() == [-100] * (1 + IMG_TOKENS) + trained


def test_image_placement_whitespace_and_misspelled_key(tok3):
  img = tok3.convert_tokens_to_ids("<image>")
  enc = lambda s, pos: C.encode(s, tok3, "llama3", image_tokens=3, image_token_id=img,
                                image_position=pos)
  ref = enc(sample(True), "keep")
  messy = sample(True, key="conversatons")
  messy["conversatons"][0]["value"] = f"  <image>\n\n {Q1} \n"
  got = enc(messy, "first")   # LLaVA's rule re-joins "<image>\n" + the stripped rest
  np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(got["labels"], ref["labels"])
  # 'keep' renders the text exactly as the data has it (Llama3-Med)
  kept = enc(messy, "keep")["input_ids"]
  assert (kept == img).sum() == 3 and kept.tolist() != ref["input_ids"].tolist()
  text = tok3.decode(kept[kept != img][1:].tolist())
  assert text.startswith(f"<|start_header_id|>user<|end_header_id|>\n\n  \n\n {Q1} \n<|eot_id|>")
  # A VQA-style sample without a marker gets the image in front, as LLaVA's eval does.
  bare = sample(True)
  bare["conversations"][0]["value"] = Q1
  np.testing.assert_array_equal(enc(bare, "keep")["input_ids"], ref["input_ids"])


def test_per_image_counts(tok3):
  img = tok3.convert_tokens_to_ids("<image>")
  s = {"id": "two", "image": ["a.png", "b.png"], "conversations": [
      {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]}
  ids = C.encode(s, tok3, "llama3", image_tokens=[3, 7], image_token_id=img)["input_ids"]
  runs = np.diff(np.flatnonzero(np.diff(np.r_[0, ids == img, 0])))[::2]
  assert runs.tolist() == [3, 7]


def test_template_mismatch_names_sample(tmp_path):
  """A tokenizer that merges across the turn boundary cannot give exact per-turn labels."""
  tok = load(llama3_tokenizer(tmp_path, split=False))
  s = {"id": "pmc-42", "conversations": [{"from": "human", "value": "Is there a fracture?"},
                                         {"from": "gpt", "value": "Yes."}]}
  with pytest.raises(BadSample, match="pmc-42") as e:
    C.encode(s, tok, "vicuna_v1", image_tokens=1, image_token_id=0)
  assert e.value.reason == "template_mismatch" and e.value.sample_id == "pmc-42"


def turns(*pairs):
  return [{"from": f, "value": v} for f, v in pairs]


@pytest.mark.parametrize("bad,reason", [
    ("not a dict", "malformed"),
    ({"id": "b"}, "malformed"),
    ({"id": "b", "conversations": []}, "empty_conversation"),
    ({"id": "b", "conversations": turns(("human", " "), ("gpt", ""))}, "empty_conversation"),
    ({"id": "b", "conversations": turns(("human", "Hi?"), ("human", "Hello?"))}, "one_sided"),
    ({"id": "b", "conversations": turns(("gpt", "A."), ("human", "Q?"))}, "malformed"),
    ({"id": "b", "conversations": turns(("human", "Q?"), ("gpt", "A."), ("human", "Q2?"))},
     "malformed"),
    ({"id": "b", "conversations": turns(("human", "<image>\nQ?"), ("gpt", "A."))}, "malformed"),
    ({"id": "b", "image": "x.png", "conversations": turns(("human", "<image><image>Q?"),
                                                          ("gpt", "A."))}, "malformed"),
    ({"id": "b", "conversations": turns(("human", "Q?<|eot_id|>"), ("gpt", "A."))},
     "malformed"),
    ({"id": "b", "conversations": [{"from": "robot", "value": "x"}]}, "malformed"),
])
def test_bad_samples(tok3, bad, reason):
  with pytest.raises(BadSample) as e:
    C.encode(bad, tok3, "llama3", image_tokens=4, image_token_id=1)
  assert e.value.reason == reason
  if isinstance(bad, dict):
    assert e.value.sample_id == "b" and "'b'" in str(e.value)


def test_truncation_never_cuts_an_image(tok3):
  img = tok3.convert_tokens_to_ids("<image>")
  full = C.encode(sample(False), tok3, "llama3", image_tokens=IMG_TOKENS, image_token_id=img)
  ids = full["input_ids"]
  first_trained = int(np.flatnonzero(full["labels"] != -100)[0])
  image_end = int(np.flatnonzero(ids == img)[-1]) + 1
  cut = C.encode(sample(False), tok3, "llama3", image_tokens=IMG_TOKENS, image_token_id=img,
                 max_len=first_trained + 3)
  np.testing.assert_array_equal(cut["input_ids"], ids[:first_trained + 3])
  np.testing.assert_array_equal(cut["labels"], full["labels"][:first_trained + 3])
  for max_len, why in [(image_end - 1, "image"), (first_trained, "no trained")]:
    with pytest.raises(BadSample, match=why) as e:
      C.encode(sample(False), tok3, "llama3", image_tokens=IMG_TOKENS, image_token_id=img,
               max_len=max_len)
    assert e.value.reason == "too_long" and e.value.sample_id == "s1"


@pytest.mark.parametrize("template", C.TEMPLATES)
def test_render_prompt_is_the_training_prefix(tok3, template):
  img = tok3.convert_tokens_to_ids("<image>")
  s = sample(True)
  if template == "plain":
    s["conversations"] = s["conversations"][:2]
  out = C.encode(s, tok3, template, image_tokens=IMG_TOKENS, image_token_id=img)
  prompt = C.render_prompt(Q1, tok3, template, image_tokens=IMG_TOKENS, image_token_id=img)
  first_trained = int(np.flatnonzero(out["labels"] != -100)[0])
  np.testing.assert_array_equal(prompt, out["input_ids"][:first_trained])
  assert prompt.dtype == np.int32


@pytest.mark.parametrize("template", ["llama3", "vicuna_v1", "mistral_instruct"])
def test_multi_turn_prompt_is_the_training_prefix_of_the_second_answer(tok3, tok2, template):
  """A chat's second question with the first turn as history renders exactly like training
  renders that conversation up to the second answer; the image goes to the first question."""
  tok = tok3 if template == "llama3" else tok2
  img = tok.convert_tokens_to_ids("<image>")
  out = C.encode(sample(True), tok, template, image_tokens=IMG_TOKENS, image_token_id=img)
  trained = np.flatnonzero(out["labels"] != -100)
  second = int(trained[np.flatnonzero(np.diff(trained) > 1)[0] + 1])  # first id of answer 2
  prompt = C.render_prompt(Q2, tok, template, image_tokens=IMG_TOKENS, image_token_id=img,
                           history=[(Q1, A1)])
  np.testing.assert_array_equal(prompt, out["input_ids"][:second])
  with pytest.raises(BadSample, match="special token"):
    C.render_prompt(Q2, tok, template, image_tokens=0, image_token_id=img,
                    history=[(Q1, f"{A1}{tok.eos_token}")])


def test_stop_tokens(tok3, tok2):
  ids = lambda *t: [tok3.convert_tokens_to_ids(x) for x in t]
  assert C.stop_token_ids(tok3, "llama3") == ids("<|eot_id|>", "<|end_of_text|>")
  assert C.stop_token_ids(tok2, "vicuna_v1") == [tok2.convert_tokens_to_ids("</s>")]
  with pytest.raises(ValueError, match="llama3"):
    C.stop_token_ids(tok2, "llama3")
