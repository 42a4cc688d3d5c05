"""Whitespace: each code base's rule (LLaVA, LLaVA-NeXT, Llama3-Med, plain), with texts that have
leading / trailing spaces and newlines, in turns with and without <image>."""
import copy

import pytest

from conversation_data import (A1, A2, IMG_TOKENS, Q1, Q2, VICUNA_SYSTEM, conv, mistral_legacy,
                               mistral_nonlegacy, tok3)  # noqa: F401 - fixtures
from data import conversation as C
from reference_templates import (MULTIMODAL, REF_IMAGE, expand, llama3_med, llava_med_mistral,
                                 llava_vicuna_v1, ref_preprocess_multimodal_next,
                                 ref_tokenizer_image_token)

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
