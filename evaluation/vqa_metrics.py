"""LLaVA-Med VQA metrics, reproduced quirk for quirk, with strict variants beside them.

The Llama3-Med table reports LLaVA-Med's numbers (llava/eval/run_eval.py + eval_metrics/), so
these must match them exactly, including behaviour that looks wrong:
- `normalize` keeps ':', '.', "'" and other characters outside LLaVA-Med's punctuation list,
  removes at most 32 periods per pass (upstream passes re.UNICODE, 32, where `re.sub` takes its
  count), and "expands" contractions by adding apostrophes ("dont" -> "don't").
- closed: a hit needs "yes" or "no" somewhere in the normalized prediction (any substring: "not",
  "normal", "know", "eyes") AND the normalized answer as a substring of it. So a correct "left lung"
  to a closed non-yes/no question misses unless the prediction happens to contain "no"/"yes".
  run_eval.py forgot to count the misses that do contain yes/no (its successor run_eval_batch.py
  says so and counts them); like DESIGN.md we count every closed question in the denominator.
- open: LLaVA-Med's `recall` from calculate_f1score: matched words are counted with their count in
  the prediction, so repeating an answer word raises the score; 0 when either side is empty or
  nothing matches. Both texts are normalized twice (run_eval.py, then calculate_f1score).
Strict variants: exact equality of the normalized strings.
`closed_accuracy_substring` is run_eval_batch.py's closed rule (substring only, no yes/no test),
kept for comparing with numbers produced by that script.
"""
from __future__ import annotations

import collections
import re
from typing import Iterable, Optional

_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Upstream: "(?!<=\d)(\.)(?!\d)"; the intended look-behind is spelt as a look-ahead that always
# holds at a '.', so any period not followed by a digit goes.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_PER_PASS = int(re.UNICODE)  # 32, see the module docstring
_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6",
                seven="7", eight="8", nine="9", ten="10")
_ARTICLES = frozenset(("a", "an", "the"))
# LLaVA-Med's (VQA-eval) table minus its capitalized keys (never reached: text is lowercased first)
# and its identity entries. "somebody'd" -> "somebodyd" is upstream's own reversed entry.
_CONTRACTIONS = dict(p.split("=") for p in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're
whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
youll=you'll youre=you're youve=you've
""".split())

OPEN, CLOSED = "OPEN", "CLOSED"


def normalize(text: str) -> str:
  """LLaVA-Med's normalize_word applied to lowercased text (what run_eval.py does)."""
  text = original = text.lower()
  # A punctuation mark next to a space anywhere in the input, or any digit,digit comma, deletes that
  # mark everywhere; otherwise it becomes a space ("left-sided" -> "left sided").
  glue = bool(_DIGIT_COMMA_DIGIT.search(original))
  for p in _PUNCT:
    delete = glue or p + " " in original or " " + p in original
    text = text.replace(p, "" if delete else " ")
  text = _PERIOD.sub("", text, count=_PERIODS_PER_PASS)
  words = [_NUMBERS.get(w, w) for w in text.split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words).replace(",", "")


def token_recall(pred: str, gt: str) -> float:
  """LLaVA-Med open-question recall (0..1) of normalized strings (normalized again, as upstream)."""
  p = collections.Counter(normalize(pred).split())
  g = collections.Counter(normalize(gt).split())
  if not p or not g:
    return 0.0
  tp = sum(n for w, n in p.items() if w in g)        # prediction's counts, repeats included
  fn = sum(n for w, n in g.items() if w not in p)
  return tp / (tp + fn) if tp else 0.0


def closed_hit(pred: str, gt: str) -> bool:
  """LLaVA-Med closed rule on normalized strings."""
  return ("yes" in pred or "no" in pred) and gt in pred


def score_one(answer_type: str, gt: str, pred: str) -> dict:
  """Per-question scores (0..1) from raw texts."""
  g, p = normalize(gt), normalize(pred)
  row = {"answer_type": answer_type, "strict": float(p == g)}
  if answer_type == OPEN:
    row["recall"] = token_recall(p, g)
  elif answer_type == CLOSED:
    row["hit"] = float(closed_hit(p, g))
    row["substring_hit"] = float(g in p)
  else:
    raise ValueError(f"answer_type must be {OPEN} or {CLOSED}, got {answer_type!r}")
  return row


def _pct(values: list) -> Optional[float]:
  return 100.0 * sum(values) / len(values) if values else None


def aggregate(rows: Iterable[dict]) -> dict:
  """Means x100 over `score_one` rows; None where a question type is absent."""
  rows = list(rows)
  op = [r for r in rows if r["answer_type"] == OPEN]
  cl = [r for r in rows if r["answer_type"] == CLOSED]
  return {
      "open_recall": _pct([r["recall"] for r in op]),
      "closed_accuracy": _pct([r["hit"] for r in cl]),
      "n_open": len(op),
      "n_closed": len(cl),
      "strict_open_accuracy": _pct([r["strict"] for r in op]),
      "strict_closed_accuracy": _pct([r["strict"] for r in cl]),
      "closed_accuracy_substring": _pct([r["substring_hit"] for r in cl]),
  }
