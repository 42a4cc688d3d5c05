"""Response bodies shaped as the OpenAI chat-completions API shapes them: the completion object,
stream chunks, usage, and `logprobs.content[]` entries ({token, logprob, bytes, top_logprobs}).

Token strings and bytes come from the tokenizer's own vocabulary: a byte-level BPE token (Llama-3)
maps back to its bytes through GPT-2's byte alphabet, a SentencePiece piece (Llama-2, Mistral)
through its `▁` spaces and `<0xNN>` byte fallbacks, an added token (`<|eot_id|>`) is its text. A
token that ends mid-character has its exact bytes and a text with U+FFFD, as OpenAI's do.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Optional, Sequence

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokens:
  """Token id -> (text, bytes) of one tokenizer, cached."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    self.byte_level = "ByteLevel" in repr(decoder)
    self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    self._info = functools.lru_cache(maxsize=65536)(self._compute)

  def _compute(self, token_id: int) -> tuple:
    piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
      raw = b""
    elif token_id in self.added:
      raw = piece.encode()
    elif self.byte_level:
      raw = bytes(_byte_decoder().get(c, 0) for c in piece)
    elif _BYTE_PIECE.fullmatch(piece):
      raw = bytes([int(piece[3:5], 16)])
    else:
      raw = piece.replace("\u2581", " ").encode()
    return raw.decode("utf-8", errors="replace"), list(raw)

  def entry(self, token_id: int, logprob: float, top: Sequence = ()) -> dict:
    """One `logprobs.content[]` item: the chosen token and its `top` [(id, logprob)] rivals."""
    text, raw = self._info(int(token_id))
    return {"token": text, "logprob": float(logprob), "bytes": raw,
            "top_logprobs": [self.top(t, lp) for t, lp in top]}

  def top(self, token_id: int, logprob: float) -> dict:
    text, raw = self._info(int(token_id))
    return {"token": text, "logprob": float(logprob), "bytes": raw}


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return {c: b for b, c in bytes_to_unicode().items()}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def logprobs(content: Optional[list]) -> Optional[dict]:
  return None if content is None else {"content": content, "refusal": None}


def choice(index: int, text: str, finish_reason: str, content: Optional[list]) -> dict:
  return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None,
                                      "annotations": []},
          "logprobs": logprobs(content), "finish_reason": finish_reason}


def completion(meta: dict, choices: list, usage_: dict) -> dict:
  return {**meta, "object": "chat.completion", "choices": choices, "usage": usage_,
          "service_tier": "default", "system_fingerprint": None}


def chunk(meta: dict, index: int, delta: dict, *, finish: Optional[str] = None,
          content: Optional[list] = None, include_usage: bool = False) -> str:
  """One server-sent event of a stream; with include_usage every chunk but the last says
  "usage": null, as OpenAI's do."""
  body = {**meta, "object": "chat.completion.chunk", "service_tier": "default",
          "system_fingerprint": None,
          "choices": [{"index": index, "delta": delta, "logprobs": logprobs(content),
                       "finish_reason": finish}]}
  if include_usage:
    body["usage"] = None
  return sse(body)


def usage_chunk(meta: dict, usage_: dict) -> str:
  return sse({**meta, "object": "chat.completion.chunk", "service_tier": "default",
              "system_fingerprint": None, "choices": [], "usage": usage_})


def sse(body) -> str:
  return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
