"""Incremental detokenization of one answer: text that is final, cut at the first stop string, and
the tokens that text covers (so streamed logprobs and usage count exactly the tokens returned)."""
from __future__ import annotations

from typing import Optional, Sequence


class TextState:
  """Tokens go in one at a time (`push`); out come text deltas that add up to the stripped
  answer. Leading whitespace is never sent, trailing whitespace waits for what follows it, and
  text that could still become a stop string (or an incomplete UTF-8 sequence) is held back.
  Without a tokenizer there is no text and every token is released at once."""

  def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
    self.tokenizer, self.stops = tokenizer, [s for s in stop_strings if s]
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.tokens: list = []
    self.ends: list = []      # len(decode(tokens[:k + 1])) for every k
    self.raw, self.emitted, self.released = "", 0, 0
    self.text, self.stopped, self.closed = "", False, False

  def push(self, token: Optional[int], final: bool) -> tuple:
    """Adds `token` (None: nothing new) -> (new final text, number of tokens newly released).
    `final`: the answer ends here (a stop token, the length limit, a cancel)."""
    if self.closed:
      return "", 0
    if token is not None:
      self.tokens.append(int(token))
      if self.tokenizer is not None:
        self.raw = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
      self.ends.append(len(self.raw))
    raw = self.raw
    cut = min((i for i in (raw.find(s) for s in self.stops) if i >= 0), default=-1)
    if cut >= 0:
      raw, final, self.stopped = raw[:cut], True, True
    ready = len(raw) if final else max(self.emitted, len(raw.rstrip("\ufffd")) - self.hold)
    ready = min(ready, len(raw.rstrip()))
    start = max(self.emitted, len(raw) - len(raw.lstrip()))
    delta = raw[start:ready] if ready > start else ""
    self.emitted = max(self.emitted, ready)
    if self.tokenizer is None:
      covered = len(self.tokens)
    elif cut >= 0:   # the tokens whose text starts before the stop string
      covered = next((k for k, e in enumerate(self.ends) if e >= cut), len(self.ends)) + (cut > 0)
      covered = min(covered, len(self.tokens))
    elif final:
      covered = len(self.tokens)
    else:   # the leading tokens whose text is all sent
      covered = self.released
      while covered < len(self.ends) and self.ends[covered] <= self.emitted:
        covered += 1
    new = max(0, covered - self.released)
    self.released += new
    if final:
      self.text, self.closed = raw.strip(), True
      self.tokens = self.tokens[:self.released]
    return delta, new
