"""Loading a model's tokenizer from disk: a checkpoint dir of this project keeps it in
CKPT/tokenizer, a HF model dir holds it at its top. A broken file is named, never a bare parse
error from `tokenizers`.

A dir with tokenizer.model and no tokenizer.json (Llama-2 / Vicuna / Mistral releases, LLaVA
checkpoints) is tokenized by SentencePiece itself, as LLaVA trains these models
(`use_fast=False`): transformers 5 converts such a model to a fast tokenizer whose BPE splits runs
of spaces otherwise ('.' '▁▁▁▁' '[' where SentencePiece gives '.' '▁▁▁' '▁['), so the ids would
not be the reference's. A dir with tokenizer.json loads that file (the publisher's own).
"""
from __future__ import annotations

import os

from data.jsonfile import malformed_json_in


# A dir holding none of these is not a tokenizer (transformers would take its name for a hub id).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str):
  """The tokenizer of a checkpoint dir (CKPT/tokenizer) or of a HF model dir (the dir itself)."""
  sub = os.path.join(path, "tokenizer")
  where = sub if os.path.isdir(sub) else path
  if not os.path.isdir(where):
    raise FileNotFoundError(f"tokenizer dir not found: {path}")
  if where == path and os.path.isdir(os.path.join(path, "params")):   # a damaged checkpoint dir
    from vlm.damage import rebuild_hint
    raise FileNotFoundError(f"damaged checkpoint: {path} has no tokenizer; {rebuild_hint(path)}")
  if not any(os.path.exists(os.path.join(where, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"{where} is not a tokenizer dir (none of {', '.join(TOKENIZER_FILES)}"
                            "); pass a HF tokenizer dir or a checkpoint dir holding tokenizer/")
  sentencepiece = sentencepiece_only(where)
  try:
    if sentencepiece:
      from data.slow_tokenizer import SentencePieceTokenizer
      return SentencePieceTokenizer.from_pretrained(where, local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=False)
  except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception on a broken file
    bad = malformed_json_in(where)   # name the file transformers could not parse
    if bad is not None:
      raise bad from e
    if sentencepiece and not isinstance(e, OSError):
      raise FileNotFoundError(f"{os.path.join(where, 'tokenizer.model')}: not a readable "
                              f"SentencePiece model ({e})"[:400]) from None
    if not isinstance(e, (OSError, ValueError)):
      raise
    raise FileNotFoundError(f"{path}: no usable tokenizer in {where} ({e})"[:400]) from None


def sentencepiece_only(where: str) -> bool:
  """The dir's tokenizer is a SentencePiece model with no tokenizer.json beside it."""
  return (os.path.isfile(os.path.join(where, "tokenizer.model"))
          and not os.path.exists(os.path.join(where, "tokenizer.json")))
