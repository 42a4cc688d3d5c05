"""Zero-shot medical VQA benchmarks (VQA-RAD, SLAKE, PathVQA) scored with LLaVA-Med's metrics.

  python -m evaluation.vqa score --gt test.json --pred answers.jsonl --out metrics.json
  python -m evaluation.vqa score --name Llama3-Med \
      --table vqa_rad=M1.json slake=M2.json path_vqa=M3.json

Ground truth is a LLaVA-Med test.json (list of {id, answer_type OPEN|CLOSED, conversations or the
misspelt conversatons}; the answer is the gpt turn, conversations[1]); answers are JSONL rows
{question_id, text}, as `run` writes them.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

from data.errors import UserError, cli_errors
from data.jsonfile import load_json, write_json, write_jsonl
from evaluation import vqa_metrics
from evaluation.records import check_same_ids, gt_answer, read_answers, read_by_id

_DATASET_NAMES = {"vqa_rad": "VQA-RAD", "slake": "SLAKE", "path_vqa": "VQA-PATH"}


def score_files(gt_path: str, pred_path: str) -> tuple:
  """(metrics, per-question rows) for one dataset."""
  gt = read_by_id(gt_path, ("id",))
  pred = read_answers(pred_path)
  check_same_ids(gt, pred, gt_path, pred_path)
  rows = []
  for key, item in gt.items():
    kind, answer = gt_answer(item, key, gt_path)
    rows.append({"question_id": key, **vqa_metrics.score_one(kind, answer, pred[key])})
  metrics = vqa_metrics.aggregate(rows)
  metrics.update(gt=gt_path, pred=pred_path)
  return metrics, rows


def md_row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def md_header(cells) -> list:
  return [md_row(cells), "|" + "---|" * len(cells)]


def _fmt(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{x:.2f}"


def table(named_metrics: list, name: str) -> str:
  """Markdown in the layout of Llama3-Med Table 3: open and closed per dataset, then their plain
  mean. A second row gives the strict (exact match) variants."""
  head = ["Model"]
  for ds, _ in named_metrics:
    shown = _DATASET_NAMES.get(ds, ds)
    head += [f"{shown} Open", f"{shown} Closed"]
  head.append("Avg")
  lines = md_header(head)
  for label, keys in ((name, ("open_recall", "closed_accuracy")),
                      (f"{name} (strict exact match)",
                       ("strict_open_accuracy", "strict_closed_accuracy"))):
    vals = [m.get(k) for _, m in named_metrics for k in keys]
    mean = None if any(v is None for v in vals) else sum(vals) / len(vals)
    lines.append(md_row([label] + [_fmt(v) for v in vals + [mean]]))
  return "\n".join(lines)


def _parse_table_args(items: list) -> list:
  out = []
  for item in items:
    ds, sep, path = item.partition("=")
    if not sep or not ds or not path:
      raise UserError(f"--table expects DATASET=METRICS.json, got {item!r}")
    out.append((ds, load_json(path)))
  return out


def cmd_score(args) -> None:
  if args.table:
    if args.gt or args.pred:
      raise UserError("--table cannot be combined with --gt/--pred")
    md = table(_parse_table_args(args.table), args.name)
    print(md)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(md + "\n")
    return
  if not (args.gt and args.pred):
    raise UserError("score needs --gt and --pred (or --table)")
  metrics, rows = score_files(args.gt, args.pred)
  if args.out:
    write_json(args.out, metrics, indent=2)
  if args.per_question:
    write_jsonl(args.per_question, rows)
  print(json.dumps(metrics, indent=2))


def _add_score_parser(sub) -> None:
  p = sub.add_parser(
      "score", help="score answers with LLaVA-Med metrics, or print the paper's table row",
      description="LLaVA-Med metrics (x100): open_recall, closed_accuracy (quirks reproduced; see "
      "evaluation/vqa_metrics.py) and strict exact-match variants. With --table, prints the "
      "Llama3-Med Table 3 row (open, closed per dataset and their plain mean) from metrics files.")
  p.add_argument("--gt", help="LLaVA-Med test.json (id, answer_type, conversations)")
  p.add_argument("--pred", help="answers JSONL (question_id, text)")
  p.add_argument("--out", help="metrics JSON to write (with --table: markdown to write)")
  p.add_argument("--per-question", help="optional JSONL of per-question scores")
  p.add_argument("--table", nargs="+", metavar="DATASET=METRICS.json",
                 help="metrics files in column order, "
                 "e.g. vqa_rad=a.json slake=b.json path_vqa=c.json")
  p.add_argument("--name", default="model", help="row label for --table")
  p.set_defaults(func=cmd_score)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m evaluation.vqa", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  from evaluation import vqa_run  # `run`: zero-shot generation (jax is imported when it runs)
  vqa_run.add_parser(sub)
  _add_score_parser(sub)
  args = parser.parse_args(argv)
  with cli_errors():
    args.func(args)


if __name__ == "__main__":
  main()
