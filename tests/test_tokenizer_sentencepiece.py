"""A tokenizer dir holding only tokenizer.model (Llama-2 / Vicuna / Mistral releases) tokenizes
exactly as the sentencepiece library does with Mistral's real model file (what LLaVA's
use_fast=False trains on); transformers 5's converted fast tokenizer splits runs of spaces
otherwise. The reference is sentencepiece itself, applied by the slow Llama tokenizer's rule:
each text between special tokens is one SentencePiece input (legacy), or only the first one gets
SentencePiece's dummy '▁' (legacy=False)."""
import json
import os
import shutil

import pytest

from data.tokenizer import load_tokenizer
from tiny_tokenizers import mistral_model_file, mistral_tokenizer

SPECIALS = ("<unk>", "<s>", "</s>")
WORDS = ["A.", "[INST]", "[/INST]", "USER:", "ASSISTANT:", "<<SYS>>", "x", "3.14", "2024",
         "héllo", "日本語", "🙂", "naïve", "ﬁ", "Ωmega", "שלום", "e\u0301"]
GAPS = ["", " ", "  ", "   ", "    ", "        ", "\t", "\t\t", " \t ", "\n", "\n\n", " \n  ",
        "\r\n", "\u00a0", "\u3000", "▁"]


def sweep() -> list:
  """Every template word after every whitespace run (and at both ends), plus texts holding the
  special tokens the way the templates put them."""
  texts = [f"{g}{w}" for g in GAPS for w in WORDS] + [f"{w}{g}" for g in GAPS for w in WORDS[:6]]
  texts += [f"A.{g}[INST] What is shown?{g}[/INST]{g}No.{g}" for g in GAPS]
  texts += ["<s>[INST] What is shown? [/INST] A 3 cm cyst.</s>[INST] Where? [/INST]",
            "USER: Is it normal? ASSISTANT: No.</s>USER: Why?\nASSISTANT:",
            "</s> spaced  out\n\ntext", "</s>", "<s>", "x</s>", "</s>  [INST]", " </s> ",
            "Ratio 1:2,  12345678901234567890  digits", "tabs\tand\t\ttabs", ""]
  return texts


def reference(sp, sp_nodummy, text: str, legacy: bool) -> list:
  """sentencepiece ids of `text` split at the special tokens."""
  ids, first = [], True
  for part in _split(text):
    if part in SPECIALS:
      ids.append(sp.piece_to_id(part))
    elif part:
      ids += (sp if legacy or first else sp_nodummy).encode(part)
    first = False
  return ids


def _split(text: str) -> list:
  import re
  return re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text)


@pytest.fixture(scope="module")
def sp_models():
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb
  sp = spm.SentencePieceProcessor(model_file=mistral_model_file())
  proto = pb.ModelProto.FromString(sp.serialized_model_proto())
  proto.normalizer_spec.add_dummy_prefix = False
  return sp, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_model_dir_is_sentencepiece(tmp_path, sp_models, legacy):
  sp, sp_nodummy = sp_models
  tok = load_tokenizer(mistral_tokenizer(tmp_path, legacy=legacy))
  texts = sweep()
  want = [reference(sp, sp_nodummy, t, legacy) for t in texts]
  calls = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  for text, w, got, batch in zip(texts, want, calls, tok.encode_batch(texts)):
    assert got == w, (text, tok.convert_ids_to_tokens(got), sp.id_to_piece(w))
    assert batch == w, text
    assert tok(text)["input_ids"] == [sp.bos_id()] + w
  assert [tok.convert_ids_to_tokens(i) for i in tok(["A.    [INST] x"])["input_ids"]] == \
      [["<s>", "▁A", ".", "▁▁▁", "▁[", "INST", "]", "▁x"]]   # the fast conversion: '▁▁▁▁' '['
  for text in texts:   # decoding is SentencePiece's (byte fallback, the dummy prefix)
    plain = [i for i in tok(text)["input_ids"] if i >= 3]
    assert tok.decode(plain, skip_special_tokens=True) == sp.decode(plain), text
  tok.add_tokens(["<image>"], special_tokens=True)   # as an import adds it, then saves
  tok.save_pretrained(tmp_path / "saved")
  with open(tmp_path / "saved" / "tokenizer_config.json") as f:
    config = json.load(f)
  assert (config["tokenizer_class"], config["legacy"], config["add_bos_token"]) == \
      ("LlamaTokenizer", legacy, True) and "backend" not in config
  again = load_tokenizer(str(tmp_path / "saved"))
  assert again.encode_batch(texts) == want and again.convert_tokens_to_ids("<image>") == 32000


def test_generic_transformers_path_agrees(tmp_path, sp_models):
  """An added token that strips spaces takes transformers' own split; with one that does not,
  both splits give the same ids (the one-regex split is the fast path, not another rule)."""
  from transformers import AddedToken
  sp, _ = sp_models
  tok = load_tokenizer(mistral_tokenizer(tmp_path))
  tok.add_tokens([AddedToken("<image>", special=True)])
  texts = sweep() + ["a <image>\nb", "<image>", "x<image>y"]
  fast_path = tok.encode_batch(texts)
  tok.add_tokens([AddedToken("<pad_r>", rstrip=True, special=True)])
  assert tok._splitter() is None
  assert tok.encode_batch(texts) == fast_path
  assert tok("q <image>  r")["input_ids"] == [1] + sp.encode("q ") + [32000] + sp.encode("  r")


def test_bare_model_file_and_a_broken_one(tmp_path):
  """No tokenizer_config.json: the model's own <unk> <s> </s>; an unreadable model is named."""
  os.makedirs(tmp_path / "bare")
  shutil.copy(mistral_model_file(), tmp_path / "bare" / "tokenizer.model")
  tok = load_tokenizer(str(tmp_path / "bare"))
  assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
  assert tok("Hi")["input_ids"][0] == 1
  os.makedirs(tmp_path / "bad")
  (tmp_path / "bad" / "tokenizer.model").write_bytes(b"\x00not a model" * 50)
  with pytest.raises(FileNotFoundError, match=r"bad/tokenizer.model: not a readable "
                                               r"SentencePiece model"):
    load_tokenizer(str(tmp_path / "bad"))
