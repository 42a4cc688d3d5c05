"""The slow SentencePiece tokenizer that data.tokenizer.load_tokenizer gives a dir holding only
tokenizer.model: SentencePiece's own ids, as LLaVA trains Llama-2 / Vicuna / Mistral
(`use_fast=False`)."""
from __future__ import annotations

import json
import os
import re

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE = "▁"


class SentencePieceTokenizer(SentencePieceBackend):
  """transformers' SentencePiece backend with the slow Llama tokenizer's rules (transformers 4
  LlamaTokenizer, what LLaVA loads): BOS / EOS per add_bos_token / add_eos_token; `legacy` (the
  default) encodes each text between special tokens as its own SentencePiece input, legacy=False
  prepends '▁' only at the start of the whole text. Special tokens default to the model's own.

  Text is split at special / added tokens with one regex and each part goes through one batched
  SentencePiece call (`encode_batch`, the data pipeline's path); transformers' generic per-
  character split is kept only for added tokens that strip spaces around them."""

  def __init__(self, vocab_file=None, add_bos_token=True, add_eos_token=False, **kwargs):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=vocab_file)
    for name, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                    ("eos_token", sp.eos_id())):
      if name not in kwargs and i >= 0:
        kwargs[name] = sp.id_to_piece(i)
    kwargs["special_tokens_pattern"] = {(True, False): "bos", (False, True): "eos",
                                        (True, True): "bos_eos"}.get(
                                            (bool(add_bos_token), bool(add_eos_token)), "none")
    self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
    self._split_re = None
    super().__init__(vocab_file=vocab_file, add_bos_token=add_bos_token,
                     add_eos_token=add_eos_token, **kwargs)

  def _update_trie(self, *args, **kwargs):
    self._split_re = None   # the added tokens changed
    return super()._update_trie(*args, **kwargs)

  def _splitter(self):
    """The regex splitting at special / added tokens (longest first), or None where an added
    token strips the text around it (transformers' own split handles that)."""
    if self._split_re is None:
      added = self._added_tokens_decoder.values()
      if any(t.lstrip or t.rstrip or t.single_word for t in added):
        self._split_re = False
      else:
        words = sorted(set(self._added_tokens_encoder) | set(self.all_special_tokens),
                       key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, words)) + ")")
    return self._split_re or None

  def tokenize(self, text, **kwargs):
    if (not kwargs.get("split_special_tokens", self.split_special_tokens)
        and self._splitter() is not None):
      return self._encode([text], str)[0]
    if self.legacy or not text:
      return super().tokenize(text, **kwargs)
    tokens = super().tokenize(SPIECE + text.replace(SPIECE, " "), **kwargs)
    if len(tokens) > 1 and tokens[0] == SPIECE and tokens[1] in self.all_special_tokens:
      tokens = tokens[1:]
    return tokens

  def encode_batch(self, texts) -> list:
    """Ids of each text without BOS / EOS: what tokenize + convert_tokens_to_ids give."""
    if self._splitter() is None or self.split_special_tokens:
      return [self.convert_tokens_to_ids(self.tokenize(t)) for t in texts]
    return self._encode(texts, int)

  def _encode(self, texts, out_type) -> list:
    """Split each text at special tokens, SentencePiece the parts in one call, reassemble."""
    parts, inputs = [], []
    unk = str(self.unk_token)
    for text in texts:
      if not self.legacy and text:
        text = SPIECE + text.replace(SPIECE, " ")
      row = []   # (special token, None) or (None, (input index, pieces to drop))
      for i, part in enumerate(self._splitter().split(text)):
        if i % 2:
          row.append((part, None))
        elif part:  # non-legacy: a part with a leading space keeps its '▁' (encoded behind <unk>)
          pad = not self.legacy and part.startswith((SPIECE, " "))
          row.append((None, (len(inputs), self._unk_length() if pad else 0)))
          inputs.append(unk + part if pad else part)
      parts.append(row)
    enc = self.sp_model.encode(inputs, out_type=out_type) if inputs else []
    space = SPIECE if out_type is str else self.sp_model.piece_to_id(SPIECE)
    specials = set(self.all_special_tokens)
    out = []
    for row in parts:
      ids = []
      for j, (special, where) in enumerate(row):
        if where is None:
          ids.append(special if out_type is str else
                     self._convert_token_to_id_with_added_voc(special))
          continue
        got = enc[where[0]][where[1]:]
        if (not self.legacy and j == 0 and got == [space] and len(row) > 1
            and row[1][0] in specials):   # as tokenize: no '▁' of its own before a special
          continue
        ids += got
      out.append(ids)
    return out

  def save_pretrained(self, save_directory, *args, **kwargs):
    """As transformers saves it, with the tokenizer_config.json a Llama tokenizer dir has: its
    class (what the rules above are), `legacy` and BOS / EOS settings transformers 5 leaves out,
    without the loading arguments it writes in."""
    out = super().save_pretrained(save_directory, *args, **kwargs)
    path = os.path.join(save_directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    for key in ("backend", "is_local", "local_files_only"):
      config.pop(key, None)
    config.update(tokenizer_class="LlamaTokenizer", legacy=self.legacy,
                  add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    return out

  def _unk_length(self) -> int:
    return len(self.sp_model.encode(str(self.unk_token)))

  def convert_tokens_to_string(self, tokens):
    """SentencePiece's own decoding (byte-fallback pieces, the dummy prefix) between special
    tokens, which are kept as written."""
    if tokens and not self.legacy and tokens[0].startswith(SPIECE):   # the '▁' tokenize put there
      tokens = [tokens[0][1:]] + list(tokens[1:])
    out, run = [], []
    specials = set(self.all_special_tokens)
    for t in tokens:
      if t in specials:
        out += [self.sp_model.decode_pieces(run), t]
        run = []
      else:
        run.append(t)
    return "".join(out + [self.sp_model.decode_pieces(run)])
