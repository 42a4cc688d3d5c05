"""Side-by-side answer-quality report (LDRT paper, Fig. 4): ROUGE-1/2/L, length ratio and hedging
words for several models' answers to the same questions, as box plots (PNG) and a markdown summary.

  python -m evaluation.report --gt GT.json --pred base=A.jsonl --pred lora=B.jsonl --out DIR

GT: JSON list or JSONL, each row with `id` or `question_id` and the reference text in `--gt-field`
(default: the first of answer, gpt4_answer, reference; else the first gpt turn in `conversations`).
Answers: JSONL rows {question_id, text}. Writes DIR/report.md, DIR/summary.json,
DIR/per_answer.jsonl and one PNG per metric plus hedging.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from typing import Optional

from data.errors import BadSample, cli_errors
from data.jsonfile import write_json, write_jsonl
from evaluation.records import check_same_ids, read_answers, read_by_id
from evaluation.text_metrics import HEDGES, TextMetrics
from evaluation.vqa import md_header, md_row

log = logging.getLogger(__name__)
GT_FIELDS = ("answer", "gpt4_answer", "reference")
BOX_METRICS = {"rouge1": "ROUGE-1 F", "rouge2": "ROUGE-2 F", "rougeL": "ROUGE-L F",
               "length_ratio": "Length ratio\n(answer words / ground-truth words)"}


def read_references(path: str, field: Optional[str] = None) -> dict:
  """{str(id): reference text}."""
  fields = (field,) if field else GT_FIELDS
  out = {}
  for key, row in read_by_id(path).items():
    text = next((row[f] for f in fields if row.get(f) is not None), None)
    if text is None:
      turns = row.get("conversations", row.get("conversatons")) or []
      text = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"),
                  None)
    if not isinstance(text, str) or not text.split():
      raise BadSample("missing_field", f"no non-empty reference text in {fields} or a gpt turn",
                      sample_id=key, path=path)
    out[key] = text
  return out


def _common_ids(refs: dict, answers: dict, gt_path: str, pred_paths: dict, lenient: bool) -> list:
  """Ids to score: all of the GT (strict), or those every model answered (lenient)."""
  if not lenient:
    for name, ans in answers.items():
      check_same_ids(refs, ans, gt_path, pred_paths[name])
    return list(refs)
  ids = [k for k in refs if all(k in ans for ans in answers.values())]
  for name, ans in answers.items():
    skipped = len(refs) - sum(k in ans for k in refs)
    extra = sum(k not in refs for k in ans)
    if skipped or extra:
      log.warning("%s: %d ground-truth ids unanswered, %d answers not in the ground truth "
                  "(skipped)", name, skipped, extra)
  if not ids:
    raise BadSample("id_mismatch", "no question is answered by every model", path=gt_path)
  log.warning("lenient: scoring %d of %d ground-truth questions", len(ids), len(refs))
  return ids


def summarize(per_answer: list, hedges: tuple) -> dict:
  """Per-model aggregates of `TextMetrics` rows."""
  out = {"n": len(per_answer)}
  for k in BOX_METRICS:
    vals = [r[k] for r in per_answer]
    out[k] = {"mean": statistics.fmean(vals), "median": statistics.median(vals)}
  totals = {h: sum(r["hedges"][h] for r in per_answer) for h in hedges}
  out["hedges"] = totals
  out["hedges_total"] = sum(totals.values())
  out["hedges_per_answer"] = out["hedges_total"] / len(per_answer)
  out["answers_with_hedge_pct"] = 100.0 * sum(
      any(r["hedges"].values()) for r in per_answer) / len(per_answer)
  return out


def plot(per_model: dict, out_dir: str, hedges: tuple) -> list:
  """One box plot per metric (models side by side) and a grouped bar chart of hedging counts.
  Saved with a tight bounding box, so no title or label is cut off whatever the names' lengths;
  a chart with nothing to draw says so instead of showing an empty axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  names, files = list(per_model), []
  long_names = max(len(n) for n in names) > 12

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=120, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    files.append(name)

  for k, title in BOX_METRICS.items():
    fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 1.4 * len(names)), 4))
    ax.boxplot([[r[k] for r in per_model[n]] for n in names], tick_labels=names)
    if long_names:
      ax.tick_params(axis="x", labelrotation=20)
    if k == "length_ratio":
      ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_title(title)
    save(fig, f"{k}.png")
  counts = {n: [sum(r["hedges"][h] for r in per_model[n]) for h in hedges] for n in names}
  fig, ax = plt.subplots(figsize=(max(3.6, 1.5 + 0.9 * len(hedges)), 4))
  ax.set_title("Hedging words")
  if not any(any(c) for c in counts.values()):
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"no hedging word in any answer\n({len(per_model[names[0]])} answers per "
            f"model, {len(hedges)} words counted)", ha="center", va="center", wrap=True,
            transform=ax.transAxes)
  else:
    width = 0.8 / len(names)
    for i, n in enumerate(names):
      bars = ax.bar([j + i * width for j in range(len(hedges))], counts[n], width, label=n)
      ax.bar_label(bars, fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(hedges))], hedges, rotation=30,
                  ha="right", rotation_mode="anchor")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("occurrences")
    ax.legend()
  save(fig, "hedging.png")
  return files


def markdown(summary: dict, gt_path: str, hedges: tuple, stemmer: bool, images: list) -> str:
  names = list(summary)
  n = summary[names[0]]["n"]
  lines = ["# Answer-quality report", "",
           f"Ground truth: `{gt_path}`, {n} questions. ROUGE F-measure (rouge-score, "
           f"stemmer {'on' if stemmer else 'off'}); hedging words counted whole-word, "
           "case-insensitive.", "",
           "## ROUGE and length (mean, median in brackets)", ""] + md_header(["Metric"] + names)
  for k, title in BOX_METRICS.items():
    cells = [f"{summary[m][k]['mean']:.4f} ({summary[m][k]['median']:.4f})" for m in names]
    lines.append(md_row([" ".join(title.split())] + cells))
  lines += ["", f"## Hedging words (occurrences over {n} answers)", ""]
  lines += md_header(["Word"] + names)
  for h in hedges:
    lines.append(md_row([h] + [str(summary[m]["hedges"][h]) for m in names]))
  lines.append(md_row(["**total**"] + [str(summary[m]["hedges_total"]) for m in names]))
  lines.append(md_row(["per answer"] + [f"{summary[m]['hedges_per_answer']:.3f}" for m in names]))
  lines.append(md_row(["answers with any (%)"]
                      + [f"{summary[m]['answers_with_hedge_pct']:.1f}" for m in names]))
  lines += ["", "## Distributions", ""] + [f"![{f[:-4]}]({f})" for f in images]
  return "\n".join(lines) + "\n"


def build(gt_path: str, preds: dict, out_dir: str, *, gt_field: Optional[str] = None,
          hedges=HEDGES, use_stemmer: bool = True, lenient: bool = False) -> dict:
  """Score every model; write plots, report.md, summary.json, per_answer.jsonl; return summary."""
  refs = read_references(gt_path, gt_field)
  answers = {name: read_answers(path) for name, path in preds.items()}
  ids = _common_ids(refs, answers, gt_path, preds, lenient)
  metrics = TextMetrics(hedges, use_stemmer=use_stemmer)
  per_model = {name: [metrics(ans[k], refs[k]) for k in ids] for name, ans in answers.items()}
  summary = {name: summarize(rows, metrics.hedges) for name, rows in per_model.items()}
  os.makedirs(out_dir, exist_ok=True)
  images = plot(per_model, out_dir, metrics.hedges)
  write_jsonl(os.path.join(out_dir, "per_answer.jsonl"),
              ({"model": name, "question_id": k, **r}
               for name, rows in per_model.items() for k, r in zip(ids, rows)))
  write_json(os.path.join(out_dir, "summary.json"), summary, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(summary, gt_path, metrics.hedges, use_stemmer, images))
  return summary


def _named_pred(item: str) -> tuple:
  name, sep, path = item.partition("=")
  if not sep or not name or not path:
    raise argparse.ArgumentTypeError(f"expected NAME=ANSWERS.jsonl, got {item!r}")
  return name, path


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gt", required=True, help="ground truth, JSON list or JSONL")
  p.add_argument("--pred", required=True, action="append", type=_named_pred,
                 metavar="NAME=ANSWERS.jsonl", help="one model's answers; repeat per model")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--gt-field", help="reference text field (default: the first of "
                 + ", ".join(GT_FIELDS) + " present, else the gpt turn)")
  p.add_argument("--hedges", default=",".join(HEDGES),
                 help="comma-separated hedging words/phrases (default: %(default)s)")
  p.add_argument("--no-stemmer", action="store_true", help="ROUGE without the Porter stemmer")
  p.add_argument("--lenient", action="store_true",
                 help="score only questions every model answered (logged) instead of failing")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  preds = dict(args.pred)
  if len(preds) != len(args.pred):
    p.error("model names given to --pred must be unique")
  with cli_errors():
    summary = build(args.gt, preds, args.out, gt_field=args.gt_field,
                    hedges=args.hedges.split(","), use_stemmer=not args.no_stemmer,
                    lenient=args.lenient)
  print(json.dumps(summary, indent=2))
  print(f"wrote {os.path.join(args.out, 'report.md')}")


if __name__ == "__main__":
  main()
