"""Answer-quality report: ROUGE (against rouge-score itself), hedging counts and length ratios by
hand, PNG box plots and the side-by-side markdown from two answer files."""
import json
import os

import pytest
from rouge_score import rouge_scorer

from evaluation import report
from evaluation.text_metrics import TextMetrics

GT = {
    "q1": "The mass in the left lung is a benign hamartoma.",
    "q2": "Dose distribution follows the tumour contour closely.",
    "q3": "No fracture is seen.",
}
BASE = {
    "q1": "It appears that the left lung mass may possibly be benign; it MAY be a hamartoma.",
    "q2": "The dose appears to follow the contour. Maybe it could be conformal.",
    "q3": "There seems to be no fracture, but it might be subtle.",
}
LORA = {
    "q1": "A benign hamartoma in the left lung.",
    "q2": "Dose distribution follows the tumour contour.",
    "q3": "No fracture.",
}


def _write(tmp_path, gt=GT, models=(("base", BASE), ("lora", LORA))):
  gt_path = tmp_path / "gt.jsonl"
  gt_path.write_text("".join(json.dumps({"question_id": k, "answer": v}) + "\n"
                             for k, v in gt.items()))
  preds = {}
  for name, answers in models:
    preds[name] = tmp_path / f"{name}.jsonl"
    preds[name].write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n"
                                   for k, v in answers.items()))
  return gt_path, preds


def test_hedging_counts_by_hand():
  m = TextMetrics()
  # BASE q1: "appears" 1; "may" 2 ("may" and "MAY", case-insensitive); "possibly" 1
  assert m.hedge_counts(BASE["q1"]) == dict(appears=1, possibly=1, might=0, may=2, likely=0,
                                            suggests=0, seems=0, could=0)
  # BASE q2: "appears" 1, "could" 1; "Maybe" is not the whole word "may"
  counts = m.hedge_counts(BASE["q2"])
  assert (counts["appears"], counts["could"], counts["may"]) == (1, 1, 0)
  # a custom list, phrases included, longest phrase first
  custom = TextMetrics(["may be", "Suggestive"])
  assert custom.hedge_counts("This may  be suggestive; suggestiveness may be.") == {
      "may be": 2, "suggestive": 1}


def test_rouge_and_length_ratio():
  m = TextMetrics()
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  ref = scorer.score(GT["q1"], BASE["q1"])
  got = m(BASE["q1"], GT["q1"])
  for k in ("rouge1", "rouge2", "rougeL"):
    assert got[k] == pytest.approx(ref[k].fmeasure)
  # by hand: "the cat sat" vs "the cat": unigram P = 2/3, R = 1 -> F = 0.8; bigram P = 1/2, R = 1
  # -> F = 2/3; lengths 3 / 2 words -> ratio 1.5
  small = m("the cat sat", "the cat")
  assert (small["rouge1"], small["rouge2"], small["length_ratio"]) == pytest.approx(
      (0.8, 2 / 3, 1.5))
  with pytest.raises(ValueError, match="empty"):
    m("x", "  ")


def test_report_builds_plots_and_markdown(tmp_path, capsys):
  gt, preds = _write(tmp_path)
  out = tmp_path / "rep"
  report.main(["--gt", str(gt), "--pred", f"base={preds['base']}", "--pred",
               f"lora={preds['lora']}", "--out", str(out)])
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert pngs == ["hedging.png", "length_ratio.png", "rouge1.png", "rouge2.png", "rougeL.png"]
  for name in pngs:
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name

  summary = json.loads((out / "summary.json").read_text())
  m = TextMetrics()
  for name, answers in (("base", BASE), ("lora", LORA)):
    rows = [m(answers[k], GT[k]) for k in GT]
    for k in ("rouge1", "rouge2", "rougeL", "length_ratio"):
      assert summary[name][k]["mean"] == pytest.approx(sum(r[k] for r in rows) / 3)
  # hand counts over BASE: appears 2 (q1, q2), may 2, possibly 1, could 1, seems 1, might 1 = 8
  assert summary["base"]["hedges"]["appears"] == 2
  assert summary["base"]["hedges_total"] == 8
  assert summary["base"]["answers_with_hedge_pct"] == 100.0
  assert summary["lora"]["hedges_total"] == 0
  # LORA answer / ground-truth words: q1 7 / 10, q2 6 / 7, q3 2 / 4 -> median 0.7
  assert summary["lora"]["length_ratio"]["median"] == pytest.approx(0.7)

  md = (out / "report.md").read_text()
  assert "| Metric | base | lora |" in md
  assert "| appears | 2 | 0 |" in md and "| **total** | 8 | 0 |" in md
  r1 = f"{summary['base']['rouge1']['mean']:.4f}"
  assert f"| ROUGE-1 F | {r1} (" in md
  for name in pngs:
    assert f"]({name})" in md
  per_answer = [json.loads(x) for x in (out / "per_answer.jsonl").read_text().splitlines()]
  assert len(per_answer) == 6 and {r["model"] for r in per_answer} == {"base", "lora"}


def test_report_id_mismatch_and_lenient(tmp_path, capsys):
  partial = dict(LORA)
  del partial["q2"]
  gt, preds = _write(tmp_path, models=(("base", BASE), ("lora", partial)))
  args = ["--gt", str(gt), "--pred", f"base={preds['base']}", "--pred", f"lora={preds['lora']}",
          "--out", str(tmp_path / "rep")]
  with pytest.raises(SystemExit) as e:
    report.main(args)
  assert e.value.code == 2
  assert "1 ids missing from the answers: q2" in capsys.readouterr().err
  report.main(args + ["--lenient"])
  summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
  assert summary["base"]["n"] == summary["lora"]["n"] == 2
  # without q2, BASE keeps q1 (appears, may x2, possibly) and q3 (seems, might): 6
  assert summary["base"]["hedges_total"] == 6


def test_report_gt_from_conversations_and_custom_hedges(tmp_path):
  gt_path = tmp_path / "gt.json"
  gt_path.write_text(json.dumps([
      {"id": k, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": v}]}
      for k, v in GT.items()]))
  _, preds = _write(tmp_path, models=(("base", BASE),))
  summary = report.build(str(gt_path), {"base": str(preds["base"])}, str(tmp_path / "rep"),
                         hedges=["appears", "seems"])
  assert summary["base"]["hedges"] == {"appears": 2, "seems": 1}


def test_plots_say_when_empty_and_nothing_is_cut_off(tmp_path, monkeypatch):
  """Each PNG keeps a white margin on every side (a clipped title or label would reach the
  edge), and a chart with no data says so instead of drawing an empty, signed axis."""
  import matplotlib.figure
  import numpy as np
  from PIL import Image
  texts, original = {}, matplotlib.figure.Figure.savefig

  def savefig(fig, fname, *a, **k):
    texts[os.path.basename(fname)] = " ".join(t.get_text() for t in fig.findobj(
        matplotlib.text.Text) if t.get_visible())
    texts[os.path.basename(fname) + " axes"] = [ax.get_ylim() for ax in fig.axes if ax.axison]
    return original(fig, fname, *a, **k)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  name = "llava-med-v1.5-mistral-7b-lora"   # one long name: the narrowest, longest-label plots
  gt, preds = _write(tmp_path, models=((name, LORA),))
  out = tmp_path / "rep"
  report.build(str(gt), {name: str(preds[name])}, str(out))
  assert "no hedging word in any answer" in texts["hedging.png"]
  assert texts["hedging.png axes"] == []   # no axis of made-up (negative) counts
  assert "(answer words / ground-truth words)" in texts["length_ratio.png"]
  for png in sorted(out.glob("*.png")):
    px = np.asarray(Image.open(png).convert("L"))
    border = np.concatenate([px[:3].ravel(), px[-3:].ravel(), px[:, :3].ravel(),
                             px[:, -3:].ravel()])
    assert border.min() == 255, f"{png.name}: something drawn at the edge (cut off)"
  # with hedges, the counts axis starts at 0
  gt, preds = _write(tmp_path, models=(("base", BASE),))
  report.build(str(gt), {"base": str(preds["base"])}, str(tmp_path / "rep2"))
  [(bottom, top)] = texts["hedging.png axes"]
  assert bottom == 0 and top >= 2
