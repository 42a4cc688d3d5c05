"""Templates against the reference code's rules (LLaVA, LLaVA-Med v1.5, Llama3-Med, transcribed in
reference_templates.py) and mistral-common's tokenizer: ids and labels equal, token for token."""
import numpy as np
import pytest

from conversation_data import (A1, A2, IMG_TOKENS, Q1, Q2, VICUNA_SYSTEM, conv, mistral_legacy,
                               mistral_nonlegacy, sample, tok2, tok3)  # noqa: F401 - fixtures
from data import conversation as C
from reference_templates import expand, llama3_med, llava_med_mistral, llava_vicuna_v1, \
    ref_tokenizer_image_token

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
