"""Tokenizer files carried through conversions, and LLaVA's `<image>` token with its embedding rows.

LLaVA grows the vocabulary when it adds tokens and initializes the new input and output embedding
rows with the mean of the existing rows (LlavaMetaForCausalLM.initialize_vision_tokenizer).

Files are copied byte for byte (import, the checkpoint's tokenizer/, export). Adding `<image>`
rewrites them through transformers' save_pretrained, which drops settings it does not write back
(transformers 5: `legacy`, `add_bos_token`, ...); a missing `legacy` reloads as legacy=False and a
Llama-2 / Mistral SentencePiece tokenizer then splits '</s>[INST]' as '</s>' '[' instead of
'</s>' '▁['. So the source's tokenizer_config.json settings are put back and the saved tokenizer
is checked to tokenize like the source before the import goes on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import numpy as np

from vlm.config import VLMConfig

IMAGE_TOKEN = "<image>"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
         "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
         "chat_template.jinja")


def has_tokenizer(path) -> bool:
  return path is not None and os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                       "tokenizer_config.json"))


def copy(src, dst) -> bool:
  """Copy the tokenizer files of `src` (a model dir holding other files too) into `dst`."""
  if not has_tokenizer(src):
    return False
  os.makedirs(dst, exist_ok=True)
  for f in FILES:
    if os.path.exists(os.path.join(src, f)):
      shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
  return True


def grow_embeddings(params: dict, cfg: VLMConfig, n: int):
  """Add n vocabulary rows, each the mean of the existing rows (input embedding and, when untied,
  the output head) -> (params, cfg)."""
  llm = dict(params["llm"])
  emb = np.asarray(llm["embed"])
  new = np.empty((emb.shape[0] + n, emb.shape[1]), emb.dtype)
  new[:emb.shape[0]] = emb
  new[emb.shape[0]:] = emb.astype(np.float32).mean(0).astype(emb.dtype)
  llm["embed"] = new
  if not cfg.llm.tie_embeddings:
    head = dict(llm["lm_head"])
    k = np.asarray(head["kernel"])  # [hidden, vocab]
    grown = np.empty((k.shape[0], k.shape[1] + n), k.dtype)
    grown[:, :k.shape[1]] = k
    grown[:, k.shape[1]:] = k.astype(np.float32).mean(1, keepdims=True).astype(k.dtype)
    head["kernel"] = grown
    llm["lm_head"] = head
  params = dict(params, llm=llm)
  return params, cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=cfg.llm.vocab_size + n))


def ensure_image_token(tok_dir: Optional[str], params: dict, cfg: VLMConfig, log=print):
  """Give the model an `<image>` id: the tokenizer's, else add it as a special token (saved back
  to tok_dir) and grow the embeddings when the new id is past the vocabulary -> (params, cfg)."""
  if tok_dir is None:
    if 0 <= cfg.image_token_id < cfg.llm.vocab_size:
      return params, cfg
    log(f"no tokenizer: appending an {IMAGE_TOKEN} row at id {cfg.llm.vocab_size}")
    params, new = grow_embeddings(params, cfg, 1)
    return params, new.replace(image_token_id=cfg.llm.vocab_size)
  from data.tokenizer import load_tokenizer
  tok = load_tokenizer(tok_dir)
  if IMAGE_TOKEN not in tok.get_vocab():
    settings = _read_config(tok_dir)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)  # as LLaVA adds its tokens
    tok.save_pretrained(tok_dir)
    _restore_settings(tok_dir, settings, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    _check_same_tokens(tok, load_tokenizer(tok_dir), tok_dir)
    log(f"added {IMAGE_TOKEN} to the tokenizer as id {tok.convert_tokens_to_ids(IMAGE_TOKEN)}")
  tid = tok.convert_tokens_to_ids(IMAGE_TOKEN)
  if tid >= cfg.llm.vocab_size:
    n = tid + 1 - cfg.llm.vocab_size
    log(f"growing the vocabulary {cfg.llm.vocab_size} -> {tid + 1} (new rows = mean of the old)")
    params, cfg = grow_embeddings(params, cfg, n)
  return params, cfg.replace(image_token_id=tid)


def _read_config(tok_dir) -> dict:
  path = os.path.join(tok_dir, "tokenizer_config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _restore_settings(tok_dir, before: dict, image_id: int):
  """tokenizer_config.json as save_pretrained wrote it, with every setting of the source's put
  back; added_tokens_decoder keeps the source's entries plus the new token."""
  after = _read_config(tok_dir)
  merged = {**after, **{k: v for k, v in before.items() if k != "added_tokens_decoder"}}
  if "added_tokens_decoder" in before or "added_tokens_decoder" in after:
    added = {**before.get("added_tokens_decoder", {}), **after.get("added_tokens_decoder", {})}
    added.setdefault(str(image_id), dict(content=IMAGE_TOKEN, lstrip=False, normalized=False,
                                         rstrip=False, single_word=False, special=True))
    merged["added_tokens_decoder"] = added
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump(merged, f, indent=2, ensure_ascii=False)


def _check_same_tokens(source, saved, tok_dir):
  """The saved tokenizer must split text exactly as the source does, around special tokens too
  (where SentencePiece settings such as `legacy` show)."""
  from convert.hf import ConversionError
  bos, eos = source.bos_token or "", source.eos_token or ""
  probes = [f"{bos}[INST] What is shown? [/INST] A 3 cm cyst.{eos}[INST] Where? [/INST]",
            f"USER: Is it normal? ASSISTANT: No.{eos}USER: Why?\nASSISTANT:",
            " leading space,  two spaces\n\nand newlines", f"{IMAGE_TOKEN}\nDescribe it."]
  for text in probes:
    a = source(text, add_special_tokens=True)["input_ids"]
    b = saved(text, add_special_tokens=True)["input_ids"]
    if a != b:
      raise ConversionError(
          f"{tok_dir}: the tokenizer saved with {IMAGE_TOKEN} tokenizes {text[:40]!r} as "
          f"{saved.convert_ids_to_tokens(b)[:12]}, the source as "
          f"{source.convert_ids_to_tokens(a)[:12]}")
