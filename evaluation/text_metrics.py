"""Free-text answer metrics of the LDRT paper's hallucination analysis (Fig. 4): ROUGE-1/2/L against
the ground truth, hedging-word counts (uncertainty markers such as "appears"), and length ratio."""
from __future__ import annotations

import re
from typing import Sequence

from rouge_score import rouge_scorer

from data.errors import UserError

HEDGES = ("appears", "possibly", "might", "may", "likely", "suggests", "seems", "could")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class TextMetrics:
  """Scores one (prediction, reference) pair; build once, reuse for every answer."""

  def __init__(self, hedges: Sequence[str] = HEDGES, use_stemmer: bool = True):
    self.hedges = tuple(dict.fromkeys(" ".join(h.lower().split()) for h in hedges if h.strip()))
    if not self.hedges:
      raise UserError("the hedging word list is empty")
    # Whole words or phrases, case-insensitive, longest first: "may" counts in "May be", not in
    # "maybe"; a listed "may be" wins over "may".
    alternatives = (r"\s+".join(map(re.escape, h.split()))
                    for h in sorted(self.hedges, key=len, reverse=True))
    self._hedge_re = re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.IGNORECASE)
    self._rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)

  def hedge_counts(self, text: str) -> dict:
    counts = dict.fromkeys(self.hedges, 0)
    for m in self._hedge_re.finditer(text):
      counts[" ".join(m.group(1).lower().split())] += 1
    return counts

  def __call__(self, pred: str, ref: str) -> dict:
    """{rouge1, rouge2, rougeL (F-measure), length_ratio, hedges: {word: count}}."""
    ref_words = len(ref.split())
    if not ref_words:
      raise ValueError("the ground-truth text is empty")
    scores = self._rouge.score(ref, pred)  # rouge-score takes (target, prediction)
    out = {k: scores[k].fmeasure for k in ROUGE_TYPES}
    out["length_ratio"] = len(pred.split()) / ref_words
    out["hedges"] = self.hedge_counts(pred)
    return out
