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

from data.errors import BadSample, UserError, cli_errors
from data.jsonfile import load_json, read_records
from evaluation import vqa_metrics

_DATASET_NAMES = {"vqa_rad": "VQA-RAD", "slake": "SLAKE", "path_vqa": "VQA-PATH"}
_SHOWN_IDS = 20


def _field(row: dict, keys: tuple, path: str, n: int):
  for k in keys:
    if k in row:
      return row[k]
  raise BadSample("missing_field", f"record {n} has none of {list(keys)}", path=path)


def index_by_id(rows: list, keys: tuple, path: str) -> dict:
  """{str(id): row}; ids compared as strings so 5 and "5" agree; duplicates are errors."""
  out = {}
  for n, row in enumerate(rows, 1):
    key = str(_field(row, keys, path, n))
    if key in out:
      raise BadSample("duplicate_id", f"id {key!r} appears twice", sample_id=key, path=path)
    out[key] = row
  return out


def read_answers(path: str) -> dict:
  """Answer JSONL -> {str(question_id): text}."""
  rows = index_by_id(read_records(path), ("question_id",), path)
  out = {}
  for key, row in rows.items():
    text = row.get("text")
    if not isinstance(text, str):
      raise BadSample("missing_field", "answer has no string 'text'", sample_id=key, path=path)
    out[key] = text
  return out


def check_same_ids(gt_ids, pred_ids, gt_path: str, pred_path: str) -> None:
  """Raise, listing what is missing and extra, unless both files hold the same ids."""
  missing = sorted(set(gt_ids) - set(pred_ids))
  extra = sorted(set(pred_ids) - set(gt_ids))
  if not missing and not extra:
    return
  msg = []
  for what, ids in (("missing from the answers", missing), ("not in the ground truth", extra)):
    if ids:
      more = f" (+{len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else ""
      msg.append(f"{len(ids)} ids {what}: {', '.join(ids[:_SHOWN_IDS])}{more}")
  raise BadSample("id_mismatch", f"answers {pred_path} do not match ground truth {gt_path}: "
                  + "; ".join(msg), path=pred_path)


def gt_answer(row: dict, key: str, path: str) -> tuple:
  """(answer_type, answer text) of one LLaVA-Med test.json entry."""
  conv = row.get("conversations", row.get("conversatons"))
  turn = conv[1] if isinstance(conv, list) and len(conv) > 1 else None
  if (not isinstance(turn, dict) or turn.get("from") != "gpt"
      or not isinstance(turn.get("value"), str)):
    raise BadSample("malformed_sample", "expected conversations[1] to be the gpt answer",
                    sample_id=key, path=path)
  kind = str(row.get("answer_type", "")).upper()
  if kind not in (vqa_metrics.OPEN, vqa_metrics.CLOSED):
    raise BadSample("malformed_sample", f"answer_type must be OPEN or CLOSED, got "
                    f"{row.get('answer_type')!r}", sample_id=key, path=path)
  return kind, turn["value"]


def score_files(gt_path: str, pred_path: str) -> tuple:
  """(metrics, per-question rows) for one dataset."""
  gt = index_by_id(read_records(gt_path), ("id",), gt_path)
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
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(metrics, f, indent=2)
  if args.per_question:
    with open(args.per_question, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
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
