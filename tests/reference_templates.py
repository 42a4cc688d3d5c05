"""The reference code's template and loss-mask rules, transcribed, as test oracles.

LLaVA (haotian-liu/LLaVA): llava/mm_utils.py tokenizer_image_token, llava/train/train.py
preprocess_multimodal / preprocess_v1 / preprocess_llama_2, llava/conversation.py conv_vicuna_v1;
LLaVA-Med v1.5 (microsoft/LLaVA-Med) llava/conversation.py conv_mistral_instruct; Llama3-Med
(standardmodelbio/Llama3-Med) llama3med/data/template/base.py + llama3_template.py."""
import copy
import re

from conversation_data import IMG_TOKENS, VICUNA_SYSTEM
from data import conversation as C

REF_IMAGE = -200   # IMAGE_TOKEN_INDEX of both code bases

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
