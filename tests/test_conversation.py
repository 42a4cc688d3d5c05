"""Templates and loss masks. Expected ids come from the test's own rendering of the DESIGN.md
template strings and from tokenizing the answers on their own, from transcriptions of the reference
code's rules (LLaVA, LLaVA-Med v1.5, Llama3-Med) and from mistral-common's tokenizer, never from
encode()'s output."""
import copy
import re

import numpy as np
import pytest

from data import conversation as C
from data.errors import BadSample
from tiny_tokenizers import llama2_tokenizer, llama3_tokenizer, load, mistral_tokenizer

IMG_TOKENS = 5
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
Q1, A1 = "What modality is this?", "This is a chest X-ray.\nThe heart is enlarged."
Q2, A2 = "Is there a fracture?", "No, there is no fracture."


@pytest.fixture(scope="module")
def tok3(tmp_path_factory):
  return load(llama3_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok2(tmp_path_factory):
  return load(llama2_tokenizer(tmp_path_factory.mktemp("tok")))


def sample(image_first=True, sid="s1", key="conversations"):
  q1 = f"<image>\n{Q1}" if image_first else f"{Q1}\n<image>"
  return {"id": sid, "image": "x.png", key: [
      {"from": "human", "value": q1}, {"from": "gpt", "value": A1},
      {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]}


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


# --- the reference code's rules, transcribed -----------------------------------------------------
# LLaVA (haotian-liu/LLaVA): llava/mm_utils.py tokenizer_image_token, llava/train/train.py
# preprocess_multimodal / preprocess_v1 / preprocess_llama_2, llava/conversation.py conv_vicuna_v1;
# LLaVA-Med v1.5 (microsoft/LLaVA-Med) llava/conversation.py conv_mistral_instruct; Llama3-Med
# (standardmodelbio/Llama3-Med) llama3med/data/template/base.py + llama3_template.py.

REF_IMAGE = -200   # IMAGE_TOKEN_INDEX of both code bases


@pytest.fixture(scope="module")
def mistral_legacy(tmp_path_factory):
  """Mistral's real SentencePiece tokenizer as Mistral-7B-Instruct-v0.2 ships it (legacy)."""
  return load(mistral_tokenizer(tmp_path_factory.mktemp("tok"), legacy=True))


@pytest.fixture(scope="module")
def mistral_nonlegacy(tmp_path_factory):
  return load(mistral_tokenizer(tmp_path_factory.mktemp("tok"), legacy=False))


def ref_tokenizer_image_token(prompt, tok):
  chunks = [tok(c).input_ids for c in prompt.split("<image>")]
  ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
    offset = 1
    ids.append(chunks[0][0])
  for i, x in enumerate(chunks):
    if i:
      ids += [REF_IMAGE]
    ids += x[offset:]
  return ids


def ref_preprocess_multimodal(source):
  """LLaVA train.py: every turn holding <image>; nothing else is stripped."""
  for s in source:
    if "<image>" in s["value"]:
      s["value"] = ("<image>\n" + s["value"].replace("<image>", "").strip()).strip()
  return source


def ref_preprocess_multimodal_next(source):
  """LLaVA-NeXT train.py: only a turn with one <image> that does not start with it."""
  for s in source:
    v = s["value"]
    if v.count("<image>") == 1 and not v.startswith("<image>"):
      s["value"] = ("<image>\n" + v.replace("<image>", "").strip()).strip()
  return source


MULTIMODAL = {"first": ref_preprocess_multimodal, "first_next": ref_preprocess_multimodal_next}


def ref_masks(conversation, tok, sep, sep2, legacy_fix):
  """preprocess_v1 (legacy_fix=not tokenizer.legacy) / preprocess_llama_2 (False) target masks."""
  ids = ref_tokenizer_image_token(conversation, tok)
  target = list(ids)
  cur = 1
  target[:cur] = [C.IGNORE]
  for i, rou in enumerate(conversation.split(sep2)):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = len(ref_tokenizer_image_token(rou, tok))
    instruction_len = len(ref_tokenizer_image_token(parts[0], tok)) - 2
    if i != 0 and legacy_fix:
      round_len, instruction_len = round_len - 1, instruction_len - 1
    target[cur:cur + instruction_len] = [C.IGNORE] * instruction_len
    cur += round_len
  target[cur:] = [C.IGNORE] * (len(target) - cur)
  assert cur == len(ids), "LLaVA would zero this sample's targets"
  return ids, target


def llava_vicuna_v1(source, tok, legacy, position="first"):
  source = MULTIMODAL[position](copy.deepcopy(source))
  seps = (" ", "</s>")
  text = VICUNA_SYSTEM + seps[0] + "".join(
      ("USER", "ASSISTANT")[i % 2] + ": " + s["value"] + seps[i % 2] for i, s in enumerate(source))
  return ref_masks(text, tok, " ASSISTANT: ", "</s>", legacy_fix=not legacy)


def llava_med_mistral(source, tok, system="", position="first"):
  """conv_mistral_instruct: SeparatorStyle.LLAMA_2 with sep "" and sep2 "</s>"."""
  source = MULTIMODAL[position](copy.deepcopy(source))
  text = ""
  for i, s in enumerate(source):
    m = s["value"]
    if i == 0 and system:
      m = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + m
    text += f"[INST] {m} [/INST]" if i % 2 == 0 else " " + m + " " + "</s>"
  return ref_masks(text, tok, "[/INST] ", "</s>", legacy_fix=False)


def llama3_med(source, tok, system):
  """Llama3Template.encode: the question as the data has it, the system block always; its own
  consistency check (make_labels: cur_len == total_len) comes third."""
  h = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
  prompt = h("system") + system + "<|eot_id|>" + "".join(
      (h("user") if i % 2 == 0 else h("assistant")) + s["value"] + "<|eot_id|>"
      for i, s in enumerate(source))
  ids = ref_tokenizer_image_token(prompt, tok)
  parts = re.split(r"(<\|start_header_id\|>(?:system|user|assistant)<\|end_header_id\|>\n\n)",
                   prompt)
  rounds = [parts[i] + parts[i + 1].strip() for i in range(1, len(parts), 2)]
  labels, cur, sep = list(ids), 1, h("assistant")
  labels[:1] = [C.IGNORE]
  for rou in rounds:
    p = rou.split(sep)
    if len(p) == 2:
      p[0] += sep
    round_len = len(ref_tokenizer_image_token(rou, tok)) - 1
    instruction_len = len(ref_tokenizer_image_token(p[0], tok)) - 1
    labels[cur:cur + instruction_len] = [C.IGNORE] * instruction_len
    cur += round_len
  labels[cur:] = [C.IGNORE] * (len(labels) - cur)
  return ids, labels, cur == len(ids)   # Llama3-Med warns, and trains these labels, when False


def expand(ids, labels, img, n=IMG_TOKENS):
  """Each reference image index -> n copies of our <image> id (masked)."""
  out_ids, out_labels = [], []
  for t, l in zip(ids, labels):
    k = n if t == REF_IMAGE else 1
    out_ids += [img if t == REF_IMAGE else t] * k
    out_labels += [C.IGNORE if t == REF_IMAGE else l] * k
  return out_ids, out_labels


def conv(*values, image=True):
  s = {"id": "r1", "conversations": [{"from": ("human", "gpt")[i % 2], "value": v}
                                     for i, v in enumerate(values)]}
  if image:
    s["image"] = "x.png"
  return s


PLACEMENTS = [  # human turns as LLaVA-Med data has them: image after, inside, alone, second turn
    (f"{Q1}\n<image>", A1, Q2, A2), ("What is <image> shown here?", A1, Q2, A2),
    ("<image>", A1, Q2, A2), (Q1, A1, f"<image>\n{Q2}", A2), (f"<image>\n{Q1}", A1, Q2, A2)]


@pytest.mark.parametrize("values", PLACEMENTS)
@pytest.mark.parametrize("tok_name,legacy", [("mistral_legacy", True),
                                             ("mistral_nonlegacy", False)])
def test_vicuna_v1_image_first_is_llavas_training_rule(values, tok_name, legacy, request):
  """vicuna_v1's default placement ('first') is LLaVA's preprocess_multimodal + preprocess_v1,
  token for token and label for label."""
  tok = request.getfixturevalue(tok_name)
  img = tok.convert_tokens_to_ids("<image>")
  out = C.encode(conv(*values), tok, "vicuna_v1", image_tokens=IMG_TOKENS, image_token_id=img)
  ids, labels = expand(*llava_vicuna_v1(conv(*values)["conversations"], tok, legacy), img)
  assert out["input_ids"].tolist() == ids
  assert out["labels"].tolist() == labels


@pytest.mark.parametrize("values", PLACEMENTS[:3])
@pytest.mark.parametrize("system", ["", "You are a careful radiologist."])
def test_llava_mistral_is_llava_med_v15s_rendering(mistral_legacy, values, system):
  """llava_mistral = LLaVA-Med v1.5's conv_mistral_instruct trained by preprocess_llama_2, with
  Mistral's tokenizer: ids and labels equal, ' {a} </s>' trained."""
  tok = mistral_legacy
  img = tok.convert_tokens_to_ids("<image>")
  out = C.encode(conv(*values), tok, "llava_mistral", image_tokens=IMG_TOKENS, image_token_id=img,
                 system=system)
  ids, labels = expand(*llava_med_mistral(conv(*values)["conversations"], tok, system), img)
  assert out["input_ids"].tolist() == ids
  assert out["labels"].tolist() == labels
  question = values[0].replace("<image>", "").strip()
  if not question:   # model_vqa.py would leave "<image>\n" unstripped, unlike training
    return
  prompt = C.render_prompt(values[0], tok, "llava_mistral", image_tokens=IMG_TOKENS,
                           image_token_id=img, system=system)   # LLaVA-Med model_vqa.py
  text = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + "<image>\n" + question
  want = ref_tokenizer_image_token(f"[INST] {text} [/INST]", tok)
  assert prompt.tolist() == expand(want, want, img)[0]


@pytest.fixture(scope="module")
def mistral_common_v1():
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
  from tiny_tokenizers import mistral_model_file
  return MistralTokenizer.from_file(mistral_model_file("v1")).instruct_tokenizer


def mistral_common_ids(mc, values, system):
  from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
  from mistral_common.protocol.instruct.request import InstructRequest
  msgs = [(UserMessage if i % 2 == 0 else AssistantMessage)(content=v)
          for i, v in enumerate(values)]
  return mc.encode_instruct(InstructRequest(messages=msgs, system_prompt=system or None)).tokens


@pytest.mark.parametrize("system", [None, "You are a careful radiologist."])
@pytest.mark.parametrize("tok_name", ["mistral_legacy", "mistral_nonlegacy"])
def test_mistral_instruct_is_mistral_commons_tokens(mistral_common_v1, tok_name, system, request):
  """After '</s>', '[INST]' is Mistral's '▁[' whether or not the HF tokenizer is legacy; the
  trained tokens are mistral-common's assistant message tokens (answer + </s>)."""
  tok = request.getfixturevalue(tok_name)
  values = (Q1, A1, Q2, A2)
  out = C.encode(conv(*values, image=False), tok, "mistral_instruct", image_tokens=0,
                 image_token_id=0, system=system)
  assert out["input_ids"].tolist() == mistral_common_ids(mistral_common_v1, values, system)
  from mistral_common.protocol.instruct.messages import AssistantMessage
  trained = [t for a in (A1, A2) for t in mistral_common_v1.encode_assistant_message(
      AssistantMessage(content=a), False, False)]
  assert out["labels"][out["labels"] != C.IGNORE].tolist() == trained
  prompt = C.render_prompt(Q2, tok, "mistral_instruct", image_tokens=0, image_token_id=0,
                           system=system)
  assert prompt.tolist() == mistral_common_ids(mistral_common_v1, (Q2,), system)


@pytest.mark.parametrize("values", PLACEMENTS[:2])
def test_llama3_med_configs_render_like_llama3_med(tok3, values):
  """configs/stage2.py (and the llama3_med preset) train in Llama3-Med's format: its system
  prompt and the image where the data puts it."""
  from configs import stage2
  from vlm.config import preset
  data = stage2.get_config().data
  p = preset("llama3_med")
  assert (data.system, data.image_position) == (p.system, p.image_position)
  img = tok3.convert_tokens_to_ids("<image>")
  out = C.encode(conv(*values), tok3, "llama3", image_tokens=IMG_TOKENS, image_token_id=img,
                 system=data.system, image_position=data.image_position)
  ids, labels, consistent = llama3_med(conv(*values)["conversations"], tok3,
                                      "You are a helpful language and vision assistant. ")
  assert consistent
  ids, labels = expand(ids, labels, img)
  assert out["input_ids"].tolist() == ids
  assert out["labels"].tolist() == labels


def test_image_position_at_inference_follows_the_checkpoint(tok2, tok3):
  """build_prompt renders with the checkpoint config's image position and system prompt, as
  LLaVA-Med's model_vqa.py (image first) and Llama3-Med (in place, its system) do."""
  from vlm.config import VLMConfig, VisionConfig
  from serve.prompt import build_prompt
  vision = VisionConfig(image_size=28, patch_size=14, width=8, layers=1, heads=1, mlp_dim=8)
  image = np.zeros((30, 30, 3), np.uint8)
  q = f"{Q1}\n<image>"
  cfg = VLMConfig(vision=vision, template="vicuna_v1", image_token_id=tok2.convert_tokens_to_ids(
      "<image>"))   # no image_position stored (an older checkpoint): vicuna_v1's default
  got = build_prompt(cfg, tok2, q, [image]).ids.tolist()
  want = ref_tokenizer_image_token(f"{VICUNA_SYSTEM} USER: <image>\n{Q1} ASSISTANT:", tok2)
  assert got == expand(want, want, cfg.image_token_id, n=4)[0]
  cfg = VLMConfig(vision=vision, template="llama3", image_position="keep",
                  system=C.LLAMA3_MED_SYSTEM, image_token_id=tok3.convert_tokens_to_ids("<image>"))
  got = build_prompt(cfg, tok3, q, [image]).ids.tolist()
  h = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
  want = ref_tokenizer_image_token(f"{h('system')}{C.LLAMA3_MED_SYSTEM}<|eot_id|>{h('user')}{q}"
                                   f"<|eot_id|>{h('assistant')}", tok3)
  assert got == expand(want, want, cfg.image_token_id, n=4)[0]


def test_unknown_image_position(tok3):
  with pytest.raises(ValueError, match="image_position"):
    C.encode(sample(), tok3, "llama3", image_tokens=1, image_token_id=1, image_position="last")


# --- whitespace: each code base's rule, with texts that have leading / trailing spaces and
# newlines, in turns with and without <image> ------------------------------------------------------

MESSY = [
    (f"  {Q1}\n<image> \n", f" {A1}\n", f"\n{Q2}  ", f"{A2} \n\n"),
    (f"<image>\n {Q1} ", f"\n\n{A1}", f"{Q2}\n", f"  {A2}"),
    (f"<image> {Q1}\n", A1, f" {Q2} ", f"{A2}\n"),
    (f"\n{Q1}", f"{A1} ", f" <image>\n{Q2}\n", f" {A2}"),
]


def _prompt_tokens(values):
  """The first question and its image count for render_prompt (a text-only prompt without one)."""
  return values[0], IMG_TOKENS if "<image>" in values[0] else 0


@pytest.mark.parametrize("values", MESSY)
@pytest.mark.parametrize("position", ["first", "first_next"])
@pytest.mark.parametrize("template,tok_name,legacy", [
    ("vicuna_v1", "mistral_legacy", True), ("vicuna_v1", "mistral_nonlegacy", False),
    ("llava_mistral", "mistral_legacy", True)])
def test_llava_and_llava_next_whitespace(values, position, template, tok_name, legacy, request):
  """LLaVA strips only turns holding <image>, LLaVA-NeXT only single-image turns not starting
  with it; answers and other turns keep their spaces and newlines (preprocess_v1 /
  preprocess_llama_2 over conversation.get_prompt, which strips nothing). Prompts follow the
  training rule."""
  tok = request.getfixturevalue(tok_name)
  img = tok.convert_tokens_to_ids("<image>")
  out = C.encode(conv(*values), tok, template, image_tokens=IMG_TOKENS, image_token_id=img,
                 image_position=position, system="" if template == "llava_mistral" else None)
  source = conv(*values)["conversations"]
  ref = (llava_vicuna_v1(source, tok, legacy, position) if template == "vicuna_v1" else
         llava_med_mistral(source, tok, "", position))
  ids, labels = expand(*ref, img)
  assert out["input_ids"].tolist() == ids
  assert out["labels"].tolist() == labels
  q, n = _prompt_tokens(values)
  q_ref = MULTIMODAL[position]([{"value": q}])[0]["value"]
  text = (f"{VICUNA_SYSTEM} USER: {q_ref} ASSISTANT:" if template == "vicuna_v1" else
          f"[INST] {q_ref} [/INST]")
  want = ref_tokenizer_image_token(text, tok)
  prompt = C.render_prompt(q, tok, template, image_tokens=n, image_token_id=img,
                           image_position=position,
                           system="" if template == "llava_mistral" else None)
  assert prompt.tolist() == expand(want, want, img)[0]


@pytest.mark.parametrize("values", MESSY)
def test_llama3_med_keeps_whitespace(tok3, values):
  """Llama3-Med renders every message as the data has it: the ids are its ids; the labels are
  its labels wherever its own length check passes (where it fails, Llama3-Med warns and trains
  shifted labels; we train the answers)."""
  img = tok3.convert_tokens_to_ids("<image>")
  out = C.encode(conv(*values), tok3, "llama3", image_tokens=IMG_TOKENS, image_token_id=img,
                 system=C.LLAMA3_MED_SYSTEM, image_position="keep")
  ids, labels, consistent = llama3_med(conv(*values)["conversations"], tok3, C.LLAMA3_MED_SYSTEM)
  ids, labels = expand(ids, labels, img)
  assert out["input_ids"].tolist() == ids
  if consistent:
    assert out["labels"].tolist() == labels
  eot = tok3.convert_tokens_to_ids("<|eot_id|>")
  enc = lambda a: tok3(a, add_special_tokens=False)["input_ids"] + [eot]
  trained = [t for a in values[1::2] for t in enc(a)]
  assert out["labels"][out["labels"] != C.IGNORE].tolist() == trained
  q, n = _prompt_tokens(values)
  h = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
  want = ref_tokenizer_image_token(
      f"{h('system')}{C.LLAMA3_MED_SYSTEM}<|eot_id|>{h('user')}{q}<|eot_id|>{h('assistant')}", tok3)
  prompt = C.render_prompt(q, tok3, "llama3", image_tokens=n, image_token_id=img,
                           system=C.LLAMA3_MED_SYSTEM, image_position="keep")
  assert prompt.tolist() == expand(want, want, img)[0]


# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, which LLaVA-NeXT's
# preprocess_llama3 (and conv_llava_llama_3 at inference) renders with: `| trim` on every message.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize("values", MESSY)
def test_llava_next_llama3_trims_every_message(tok3, values):
  """llama3 + first_next is LLaVA-NeXT's Llama-3 format: preprocess_multimodal's rule, then each
  message through the Llama-3 chat template (run here by transformers' Jinja), one
  apply_chat_template per message after the system one, BOS dropped from each."""
  tok = copy.deepcopy(tok3)
  tok.chat_template = LLAMA3_CHAT_TEMPLATE
  img = tok.convert_tokens_to_ids("<image>")
  chat = lambda msgs, gen=False: [REF_IMAGE if t == img else t for t in tok(  # <image> special
      tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen),
      add_special_tokens=False)["input_ids"]]
  messy_system = f" {C.LLAVA_NEXT_LLAMA3_SYSTEM}\n"   # trimmed too
  system = {"role": "system", "content": messy_system}
  source = ref_preprocess_multimodal_next(conv(*values)["conversations"])
  msgs = [{"role": ("user", "assistant")[i % 2], "content": s["value"]}
          for i, s in enumerate(source)]
  want = chat([system]) + [t for m in msgs for t in chat([m])[1:]]
  out = C.encode(conv(*values), tok, "llama3", image_tokens=IMG_TOKENS, image_token_id=img,
                 system=messy_system, image_position="first_next")
  assert out["input_ids"].tolist() == expand(want, want, img)[0]
  q, n = _prompt_tokens(values)
  q = ref_preprocess_multimodal_next([{"value": q}])[0]["value"]
  want = chat([system, {"role": "user", "content": q}], gen=True)
  prompt = C.render_prompt(values[0], tok, "llama3", image_tokens=n, image_token_id=img,
                           system=messy_system, image_position="first_next")
  assert prompt.tolist() == expand(want, want, img)[0]


@pytest.mark.parametrize("caption", [" Chest X-ray. ", "\nCardiomegaly.\n", "Edema.  \n\n"])
def test_plain_keeps_the_caption_as_is(mistral_legacy, caption):
  """LLaVA preprocess_plain: "<image>" + caption + "\\n", the caption unstripped; trained after
  the image."""
  tok = mistral_legacy
  img = tok.convert_tokens_to_ids("<image>")
  s = conv(" Describe.\n<image> ", caption)
  ids = ref_tokenizer_image_token("<image>" + caption + "\n", tok)
  n_masked = len(ref_tokenizer_image_token("<image>", tok))
  labels = [C.IGNORE] * n_masked + ids[n_masked:]
  for position in C.IMAGE_POSITIONS:
    out = C.encode(s, tok, "plain", image_tokens=IMG_TOKENS, image_token_id=img,
                   image_position=position)
    assert (out["input_ids"].tolist(), out["labels"].tolist()) == expand(ids, labels, img)
