"""`python -m evaluation.judge`: LLM-as-a-judge against any OpenAI-compatible chat endpoint.

Rules (evaluation/prompts/, or a JSON path):
  llava  LLaVA / LLaVA-Med pairwise review: the judge sees the figure caption and in-text mentions, the
         question, Assistant 1 (the reference answer) and Assistant 2 (the model), and writes two 1-10
         scores on its first line. Relative score as LLaVA computes it: mean(s2) / mean(s1) x 100; as
         LLaVA-Med computes it: mean(s2 / s1) x 100 (per category and per imaging domain as well).
  ldrt   LDRT single-answer review: caption + context + reference answer, one 0-10 score on the first
         line; mean +- std per category (detail / complex) and overall, as in the LDRT paper's Table 1.

Questions: JSONL or JSON list with `question_id` (or `id`), `question` (or `text`), `caption` (or
`fig_caption`, with `fig_label`), `context` (or `in_text_mention` / `mentions`), the reference `answer`
(or `gpt4_answer`), `category` (or `type`), optional `domain`. `data.ldrt` writes eval.jsonl in this
form; LLaVA-Med's llava_med_eval_qa50_qa.jsonl reads as is. Answers: JSONL with `question_id` and `text`
(what `evaluation.vqa run` writes). Reviews are appended to --out per row; a rerun skips rows already
reviewed. Replies whose first line does not parse are kept with `parse_error` (and left out of the
means); --retry-failed asks again for those.

Example: python -m evaluation.judge --rule ldrt --questions out/eval.jsonl --answers answers.jsonl \\
           --out reviews.jsonl --base-url http://gpu-node:8000/v1 --model Qwen/Qwen2-72B-Instruct
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from data import llm_client as lc
from data.errors import BadSample, UserError, cli_errors
from data.jsonfile import JsonlStore, load_json, write_json
from evaluation.records import read_answers, read_by_id

log = logging.getLogger(__name__)

RULES_DIR = Path(__file__).resolve().parent / "prompts"
RULES = {"llava": "llava_pairwise.json", "ldrt": "ldrt_single.json"}
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")  # LLaVA-Med's order in get_domain
_SINGLE = re.compile(r"^(?:score\s*[:=]?\s*)?([-+]?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?$", re.I)


@dataclasses.dataclass
class Rule:
  kind: str  # pairwise | single
  score_range: tuple
  system: str
  template: str
  rule: str
  context_item: str = "\t- {text}"

  @classmethod
  def load(cls, name_or_path: str) -> "Rule":
    path = lc.find_named_file(name_or_path, RULES_DIR, RULES, "rule")
    spec = {k: v for k, v in load_json(path).items() if not k.startswith("_")}
    rule = cls(**spec)
    if rule.kind not in ("pairwise", "single"):
      raise UserError(f"{path}: kind must be 'pairwise' or 'single', got {rule.kind!r}")
    return rule

  def messages(self, q: dict, answer: str) -> list[dict]:
    context = "\n".join(self.context_item.format(text=c) for c in q["context"]) or "(none)"
    content = self.template.format(caption=q["caption"] or "(none)", context=context, question=q["question"],
                                   reference=q["reference"], answer=answer, rule=self.rule)
    return [{"role": "system", "content": self.system}, {"role": "user", "content": content}]

  def parse(self, reply: str) -> tuple[Optional[list[float]], Optional[str]]:
    """(scores, None) or (None, why): the first line must hold exactly the expected numbers, in range."""
    first = reply.strip().split("\n")[0].strip()
    if not first:
      return None, "empty reply"
    if self.kind == "pairwise":  # LLaVA's parse_score: commas as spaces, exactly two fields
      parts = first.replace(",", " ").split()
      if len(parts) != 2:
        return None, f"first line has {len(parts)} fields, expected 2: {first[:80]!r}"
      try:
        scores = [float(x) for x in parts]
      except ValueError:
        return None, f"first line is not two numbers: {first[:80]!r}"
    else:
      m = _SINGLE.match(first)
      if not m:
        return None, f"first line is not one score: {first[:80]!r}"
      scores = [float(m.group(1))]
    lo, hi = self.score_range
    if not all(math.isfinite(s) and lo <= s <= hi for s in scores):
      return None, f"score outside {lo}-{hi}: {first[:80]!r}"
    return scores, None


def _domain(d) -> Optional[str]:
  if isinstance(d, dict):
    return next((k for k in DOMAINS if d.get(k)), next((k for k, v in d.items() if v), None))
  return d if isinstance(d, str) and d else None


def load_questions(path: str) -> list[dict]:
  """Questions normalized to question_id, question, caption, context (list), reference, category, domain."""
  out = []
  for qid, r in read_by_id(path, ("question_id", "id")).items():  # duplicate ids: error
    question = r.get("question", r.get("text"))
    if not isinstance(question, str):
      raise BadSample("bad_row", "needs 'question' (or 'text')", sample_id=qid, path=path)
    ref = r.get("answer", r.get("gpt4_answer", r.get("reference")))
    if not isinstance(ref, str):
      raise BadSample("bad_row", "no reference answer ('answer' or 'gpt4_answer')", sample_id=qid,
                      path=path)
    caption = r.get("caption", r.get("fig_caption")) or ""
    if r.get("fig_label") and caption:
      caption = f"{r['fig_label']}: {caption}"
    ctx = r.get("context", r.get("in_text_mention", r.get("mentions"))) or []
    ctx = [ctx] if isinstance(ctx, str) else [c["tokens"] if isinstance(c, dict) else str(c) for c in ctx]
    out.append({"question_id": qid, "question": question, "caption": caption, "context": ctx, "reference": ref,
                "category": str(r.get("category", r.get("type", "all"))), "domain": _domain(r.get("domain"))})
  return out


def judge(questions: list[dict], answers: dict, rule: Rule, client: lc.ChatClient,
          store: JsonlStore, *, rule_name: str, concurrency: int, limit: Optional[int] = None, retry_failed: bool = False) -> dict:
  """Review every question not yet in `store`; each review (parsed or not) is appended as it arrives."""
  done = store.load()
  todo = [q for q in questions if q["question_id"] not in done
          or (retry_failed and done[q["question_id"]].get("parse_error"))][:limit]
  counts = {"already done": len(done), "requested": len(todo), "parsed": 0, "parse failures": 0,
            "request failed": 0}

  def work(q):
    return client.chat(rule.messages(q, answers[q["question_id"]]), key=q["question_id"])

  def on_done(q, res, err):
    if err is not None:
      if not isinstance(err, lc.LLMError):
        raise err
      log.error("question %s: %s", q["question_id"], err)
      counts["request failed"] += 1
      return
    scores, why = rule.parse(res.text)
    counts["parsed" if why is None else "parse failures"] += 1
    store.append({"question_id": q["question_id"], "category": q["category"], "domain": q["domain"],
                  "rule": rule_name, "judge": res.model, "scores": scores, "parse_error": why,
                  "content": res.text, "prompt_tokens": res.prompt_tokens,
                  "completion_tokens": res.completion_tokens})

  lc.run_pool(todo, work, on_done, concurrency=concurrency, description="judging")
  return counts


def summarize(reviews: list[dict], kind: str) -> dict:
  """Per group ('overall', each category, each domain): counts and scores as the papers report them."""
  groups: dict[str, list[dict]] = {"overall": []}
  for r in reviews:
    for g in ("overall", r.get("category"), r.get("domain")):
      if g:
        groups.setdefault(g, []).append(r)
  out = {}
  for g, rows in groups.items():
    width = 2 if kind == "pairwise" else 1
    ok = np.array([r["scores"] for r in rows if r.get("scores")], dtype=np.float64).reshape(-1, width)
    s = {"n": len(ok), "parse_failures": sum(1 for r in rows if not r.get("scores"))}
    if len(ok) and kind == "pairwise":
      ref, model = ok[:, 0], ok[:, 1]
      pos = ref > 0
      s.update(reference_mean=float(ref.mean()), model_mean=float(model.mean()),
               relative_llava=float(model.mean() / ref.mean() * 100) if ref.mean() > 0 else None,
               relative_llava_med=float((model[pos] / ref[pos]).mean() * 100) if pos.any() else None)
    elif len(ok):
      s.update(mean=float(ok[:, 0].mean()), std=float(ok[:, 0].std()))
    out[g] = s
  return out


def summary_table(summary: dict, kind: str):
  from rich.table import Table
  cols = (["reference mean", "model mean", "relative (LLaVA)", "relative (LLaVA-Med)"] if kind == "pairwise"
          else ["mean", "std"])
  keys = (["reference_mean", "model_mean", "relative_llava", "relative_llava_med"] if kind == "pairwise"
          else ["mean", "std"])
  t = Table(title="judge scores (parse failures excluded from means; std with ddof=0)")
  for c in ["group", "n", "parse failures", *cols]:
    t.add_column(c, justify="left" if c == "group" else "right")
  for g, s in summary.items():
    t.add_row(g, str(s["n"]), str(s["parse_failures"]),
              *("-" if s.get(k) is None else f"{s[k]:.2f}" for k in keys))
  return t


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m evaluation.judge", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rule", default="llava", help=f"{' | '.join(RULES)} or a rule JSON path")
  p.add_argument("--questions", required=True, help="questions with caption, context and reference answer")
  p.add_argument("--answers", required=True, help="model answers JSONL (question_id, text)")
  p.add_argument("--reference-answers", help="JSONL (question_id, text) overriding the questions' reference")
  p.add_argument("--out", required=True, type=Path, help="reviews JSONL (appended, resumable)")
  p.add_argument("--summary", type=Path, help="summary JSON (default: OUT with .summary.json)")
  p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                 help="OpenAI-compatible base URL ending before /chat/completions (default $OPENAI_BASE_URL)")
  p.add_argument("--model", default=os.environ.get("JUDGE_MODEL"), help="judge model (default $JUDGE_MODEL)")
  p.add_argument("--api-key-env", default=lc.DEFAULT_KEY_ENV,
                 help="name of the environment variable holding the API key (unset: no key is sent)")
  p.add_argument("--retry-failed", action="store_true", help="ask again for reviews whose reply did not parse")
  p.add_argument("--lenient", action="store_true", help="skip questions without an answer instead of stopping")
  lc.add_client_args(p, temperature=0.2, max_tokens=1024)
  args = p.parse_args(argv)
  if not args.base_url or not args.model:
    p.error("give --base-url and --model (or set OPENAI_BASE_URL and JUDGE_MODEL)")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  with cli_errors():
    return run(args)


def run(args) -> int:
  """The command line's work: read, check, judge, summarize; the exit status."""
  endpoint = lc.Endpoint.parse(f"judge={args.base_url},{args.model}", default_key_env=args.api_key_env)
  rule = Rule.load(args.rule)
  questions = load_questions(args.questions)
  answers = read_answers(args.answers)
  if args.reference_answers:
    refs = read_answers(args.reference_answers)
    questions = [{**q, "reference": refs.get(q["question_id"], q["reference"])} for q in questions]
  missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
  if missing and not args.lenient:
    raise UserError(f"{len(missing)} question(s) have no answer in {args.answers}: {missing[:10]}"
                    f"{' ...' if len(missing) > 10 else ''} (--lenient skips them)")
  questions = [q for q in questions if q["question_id"] in answers]
  client = lc.client_from_args(args, [endpoint])
  with JsonlStore(args.out, key="question_id") as store:
    counts = judge(questions, answers, rule, client, store, rule_name=args.rule, concurrency=args.concurrency,
                   limit=args.limit, retry_failed=args.retry_failed)
    reviews = list(store.load().values())
  summary = summarize(reviews, rule.kind)
  summary_path = args.summary or args.out.with_name(args.out.stem + ".summary.json")
  write_json(summary_path, {"rule": args.rule, "judge": args.model, "groups": summary})
  con = lc.console()
  con.print(lc.counts_table("this run", {**counts, "skipped: no answer": len(missing)}))
  con.print(summary_table(summary, rule.kind))
  con.print(f"summary written to {summary_path}")
  return lc.finish(con, client, counts)


if __name__ == "__main__":
  sys.exit(main())
