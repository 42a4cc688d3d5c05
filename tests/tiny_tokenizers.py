"""Tiny HF tokenizers built in the test (no hub): a Llama-3-style byte-level BPE and a Llama-2 /
Vicuna / Mistral-style SentencePiece-like BPE. Both are trained with the `tokenizers` library on a
small text and saved as HF tokenizer dirs that `AutoTokenizer.from_pretrained(dir)` loads. Also
Mistral's real SentencePiece tokenizer, from the model file the mistral-common package ships.

Named tiny_tokenizers (not tokenizers) so it never shadows the `tokenizers` package on sys.path.

  from tiny_tokenizers import llama3_tokenizer, llama2_tokenizer
  path = llama3_tokenizer(tmp_path)   # -> str dir; tokenizer = load(path)
"""
from __future__ import annotations

import itertools
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
IMAGE = "<image>"
# The pre-tokenizer split of Meta's Llama-3 tokenizer.json.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus() -> list:
  """A few hundred lines of radiology-flavoured chat text, including the template words, so merges
  form across the strings the tests use (deterministic)."""
  subjects = ["the image", "this CT scan", "the chest X-ray", "the MRI", "the slide", "the lesion",
              "the left lung", "the liver", "a mass", "the heart"]
  verbs = ["shows", "does not show", "suggests", "is consistent with", "reveals"]
  objects = ["a nodule", "no abnormality", "pleural effusion", "cardiomegaly", "a fracture",
             "an enlarged lymph node", "normal anatomy", "a 3 cm cyst", "edema", "calcification"]
  questions = ["What is shown in the image?", "Is there a fracture?", "Where is the lesion?",
               "What modality is this?", "Is the heart enlarged?", "Describe the findings.",
               "How many nodules are seen?", "Is this normal?", "What organ is this?"]
  lines = []
  for s, v, o in itertools.product(subjects, verbs, objects):
    lines.append(f"{s.capitalize()} {v} {o}.")
  for q in questions:
    lines += [f"USER: {q} ASSISTANT: Yes.", f"[INST] {q} [/INST] No, it is not.",
              f"user {q} assistant The answer is no.", "A chat between a curious user and an "
              "artificial intelligence assistant. The assistant gives helpful, detailed, and "
              "polite answers to the user's questions.", "system You are a radiologist."]
  return lines


def _save(tok: Tokenizer, path: str, image_token: bool, **special) -> str:
  from transformers import PreTrainedTokenizerFast
  os.makedirs(path, exist_ok=True)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  if image_token:
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
  fast.save_pretrained(path)
  return path


def llama3_tokenizer(tmp_path, *, image_token: bool = True, split: bool = True,
                     vocab_size: int = 700) -> str:
  """Byte-level BPE with Llama-3's regex split, special tokens and BOS post-processor, plus an
  `<image>` special token unless image_token=False. split=False drops the regex split, so merges
  cross word and turn boundaries: a tokenizer that per-turn tokenization must reject."""
  tok = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
      byte_level]) if split else byte_level
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bos = "<|begin_of_text|>"
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, tok.token_to_id(bos))])])
  name = "llama3_tok" + ("" if image_token else "_noimage") + ("" if split else "_unsplit")
  return _save(tok, os.path.join(str(tmp_path), name), image_token, bos_token=bos,
               eos_token="<|end_of_text|>")


def llama2_tokenizer(tmp_path, vocab_size: int = 400) -> str:
  """SentencePiece-like BPE as HF converts Llama-2 / Vicuna / Mistral: '▁' for spaces, one
  prepended only at the start of the input (not after special tokens), byte fallback (<0x0A> for
  a newline), <unk> <s> </s>, BOS added by the post-processor."""
  tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                               split=True)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  # No newline in the training text: like Llama's vocab, a newline only exists as a byte token.
  tok.train_from_iterator(corpus(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
  spec = json.loads(tok.to_str())  # byte-fallback targets live in the model vocab, as in Llama's
  vocab = spec["model"]["vocab"]
  for b in range(256):
    vocab.setdefault(f"<0x{b:02X}>", len(vocab))
  tok = Tokenizer.from_str(json.dumps(spec))
  bos = "<s>"
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
  return _save(tok, os.path.join(str(tmp_path), "llama2_tok"), True, bos_token=bos,
               eos_token="</s>", unk_token="<unk>")


# tokenizer_config.json of mistralai/Mistral-7B-Instruct-v0.2 (chat_template left out): a slow
# LlamaTokenizer over tokenizer.model with legacy SentencePiece handling.
MISTRAL_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False,
    "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
                             for i, t in enumerate(["<unk>", "<s>", "</s>"])},
    "additional_special_tokens": [], "bos_token": "<s>", "clean_up_tokenization_spaces": False,
    "eos_token": "</s>", "legacy": True, "model_max_length": 1000000000000000019884624838656,
    "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}


def mistral_model_file(version: str = "v1") -> str:
  """A real Mistral SentencePiece model shipped in the mistral-common package (v1: the 32000-piece
  tokenizer of Mistral-7B-(Instruct-)v0.1 / v0.2)."""
  import importlib.resources
  return str(importlib.resources.files("mistral_common") / "data" / f"tokenizer.model.{version}")


def mistral_tokenizer(tmp_path, *, legacy: bool = True, **settings) -> str:
  """A HF tokenizer dir as Mistral-7B-Instruct-v0.2 ships it without tokenizer.json: the real
  tokenizer.model + its tokenizer_config.json (`legacy` and other `settings` overridable).
  Loading it converts the SentencePiece model (needs sentencepiece + protobuf)."""
  import shutil
  path = os.path.join(str(tmp_path), f"mistral_tok_{'legacy' if legacy else 'nonlegacy'}")
  os.makedirs(path, exist_ok=True)
  shutil.copy(mistral_model_file(), os.path.join(path, "tokenizer.model"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({**MISTRAL_TOKENIZER_CONFIG, "legacy": legacy, **settings}, f, indent=2)
  return path


def load(path: str):
  """As the project loads a tokenizer dir (data.tokenizer.load_tokenizer)."""
  from data.tokenizer import load_tokenizer
  return load_tokenizer(path)
