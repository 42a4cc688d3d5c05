"""LLaVA-Med VQA metrics: every normalization rule and known quirk, the score CLI and the table.

Expected values are worked out by hand from LLaVA-Med's definitions (llava/eval/run_eval.py and
eval_metrics/{glossary,evaluate_metrics,utils}.py); each case says how.
"""
import json
import re
import subprocess
import sys

import pytest

from evaluation import vqa, vqa_metrics
from evaluation.vqa_metrics import closed_hit, normalize, score_one, token_recall


@pytest.mark.parametrize("text, expected", [
    # lowercase
    ("YES", "yes"),
    # a punctuation mark with no space beside it anywhere becomes a space ...
    ("left-sided", "left sided"),
    ("lung?", "lung"),
    ("(ct)", "ct"),
    # ... but if it touches a space anywhere, every copy of it is deleted: the '-' in "x - y" and
    # also the one inside "right-sided"; the '/' has no space beside it, so it becomes a space.
    ("x - y right-sided t1/t2", "x y rightsided t1 t2"),
    # the space test looks at the input, not at spaces made by earlier marks: '/' -> ' ' leaves
    # " -x", yet '-' had no space beside it in the input, so it still becomes a space everywhere.
    ("t1/-x left-sided", "t1 x left sided"),
    # a digit,digit comma anywhere deletes every listed punctuation mark (no spaces inserted)
    ("1,000 left-sided", "1000 leftsided"),
    # commas next to spaces go
    ("lung, liver", "lung liver"),
    # periods not followed by a digit go; decimal points stay
    ("yes.", "yes"),
    ("3.5 cm.", "3.5 cm"),
    ("dr.x", "drx"),
    # number words zero..ten (and "none") become digits; others stay
    ("two lesions", "2 lesions"),
    ("none", "0"),
    ("twenty", "twenty"),
    # articles dropped (whole words only, after number mapping)
    ("the a an liver another", "liver another"),
    # contractions: apostrophes added to the listed forms, other words untouched
    ("dont isnt wont", "don't isn't won't"),
    ("don't", "don't"),
    # upstream's reversed table entry
    ("somebody'd", "somebodyd"),
    # characters outside LLaVA-Med's punctuation list survive
    ("answer: yes", "answer: yes"),
    ("50% *", "50% *"),
    ("", ""),
])
def test_normalize_rules(text, expected):
  assert normalize(text) == expected


def test_normalize_removes_at_most_32_periods_per_pass():
  # upstream calls pattern.sub("", s, re.UNICODE): re.UNICODE == 32 lands in the count slot, so only
  # the first 32 matching periods go; the 33rd stays.
  text = " ".join(["x."] * 33)
  assert normalize(text) == " ".join(["x"] * 32 + ["x."])
  # a second pass (what calculate_f1score does) removes the rest
  assert normalize(normalize(text)) == " ".join(["x"] * 33)


@pytest.mark.parametrize("gt, pred, hit", [
    ("no", "The lungs appear normal.", 1.0),   # "no" is a substring of "normal": yes/no test passes
    ("no", "not enlarged", 1.0),               # and of "not"
    ("yes", "Yes, there is an effusion.", 1.0),
    ("yes", "eyes", 1.0),                      # "yes" inside "eyes"
    ("no", "yes", 0.0),
    ("yes", "There is an effusion", 0.0),      # right in substance, but no "yes"/"no" anywhere
    ("left", "Left", 0.0),                     # closed non-yes/no answer: exact, yet a miss
    ("left", "Left, not right", 1.0),          # ... rescued by the "no" in "not"
    ("right", "I do not know", 0.0),           # has "no" but not the answer
    ("yes", "", 0.0),                          # empty prediction
])
def test_closed_rule(gt, pred, hit):
  row = score_one("CLOSED", gt, pred)
  assert row["hit"] == hit
  assert closed_hit(normalize(pred), normalize(gt)) == bool(hit)


def test_closed_variants_are_labelled_separately():
  # "Left" vs "left": strict exact match and the run_eval_batch substring rule both count it;
  # LLaVA-Med's run_eval rule does not (no yes/no in the prediction).
  row = score_one("CLOSED", "left", "Left")
  assert (row["hit"], row["substring_hit"], row["strict"]) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("gt, pred, recall", [
    # tp counts matched words with their count in the PREDICTION: left x3 = 3; fn: lung (1) -> 3/4
    ("left lung", "left left left", 0.75),
    # repeats never exceed 1: tp = 2 (lung x2), fn = 0 -> 2/2
    ("lung", "lung lung", 1.0),
    # fn counts missing words with their count in the ANSWER: tp = 1 (lung), fn = left x2 -> 1/3
    ("left left lung", "lung", 1 / 3),
    # extra prediction words do not lower recall: tp = 1 (liver), fn = 0
    ("liver", "the liver is enlarged", 1.0),
    # normalization first: "Two" -> "2", "the"/"a" dropped, "." dropped: tp 1, fn 0
    ("Two", "2.", 1.0),
    # no overlap -> 0; empty prediction -> 0 even though fn alone would be defined
    ("kidney", "liver", 0.0),
    ("kidney", "", 0.0),
    # empty answer after normalization ("the" is an article) -> 0
    ("the", "anything", 0.0),
])
def test_open_recall(gt, pred, recall):
  assert score_one("OPEN", gt, pred)["recall"] == pytest.approx(recall)
  assert token_recall(normalize(pred), normalize(gt)) == pytest.approx(recall)


def test_strict_open_is_exact_after_normalization():
  assert score_one("OPEN", "The liver.", "a liver")["strict"] == 1.0
  assert score_one("OPEN", "liver", "liver lobe")["strict"] == 0.0


def test_unknown_answer_type_is_rejected():
  with pytest.raises(ValueError, match="OPEN or CLOSED"):
    score_one("MCQ", "a", "a")


# One small dataset: (id, type, gt, pred, hand-derived score). Used through the CLI below.
CASES = [
    (1, "CLOSED", "No", "The lungs appear normal.", 1.0),  # "no" in "normal"
    (2, "CLOSED", "yes", "No.", 0.0),
    (3, "CLOSED", "left", "Left", 0.0),                    # non-yes/no closed answer
    (4, "CLOSED", "yes", "", 0.0),                         # empty prediction
    (5, "OPEN", "left lung", "left left left", 0.75),      # 3 / (3 + 1)
    (6, "OPEN", "Liver", "liver", 1.0),
    (7, "OPEN", "kidney", "", 0.0),
]
# closed: hits 1 of 4 -> 25.0; open recall: (0.75 + 1 + 0) / 3 x100 = 58.333...
# strict closed: only case 3 is an exact match -> 25.0; strict open: only case 6 -> 33.333...
EXPECTED = {"closed_accuracy": 25.0, "open_recall": 175 / 3, "n_open": 3, "n_closed": 4,
            "strict_closed_accuracy": 25.0, "strict_open_accuracy": 100 / 3,
            "closed_accuracy_substring": 50.0}  # cases 1 and 3 contain the answer


def _write_case_files(tmp_path, cases=CASES, drop=(), extra=()):
  gt = []
  for i, kind, answer, _, _ in cases:
    key = "conversatons" if i % 2 else "conversations"   # both spellings occur in LLaVA-Med files
    gt.append({"id": i, "answer_type": kind, "image": f"{i}.jpg",
               key: [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": answer}]})
  gt_path, pred_path = tmp_path / "test.json", tmp_path / "answers.jsonl"
  gt_path.write_text(json.dumps(gt))
  rows = [{"question_id": i, "text": p} for i, _, _, p, _ in cases if i not in drop]
  rows += [{"question_id": i, "text": "x"} for i in extra]
  pred_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return gt_path, pred_path


def test_score_cli_writes_metrics(tmp_path):
  gt, pred = _write_case_files(tmp_path)
  out, per_q = tmp_path / "m.json", tmp_path / "per_q.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "evaluation.vqa", "score", "--gt", str(gt), "--pred", str(pred),
       "--out", str(out), "--per-question", str(per_q)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  metrics = json.loads(out.read_text())
  for k, v in EXPECTED.items():
    assert metrics[k] == pytest.approx(v), k
  rows = {r["question_id"]: r for r in map(json.loads, per_q.read_text().splitlines())}
  for i, kind, _, _, expected in CASES:
    assert rows[str(i)]["recall" if kind == "OPEN" else "hit"] == pytest.approx(expected)


def _error(capsys, argv) -> str:
  """The one `error:` line a failing command prints (exit status 2)."""
  with pytest.raises(SystemExit) as e:
    vqa.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


def test_score_errors_on_mismatched_ids(tmp_path, capsys):
  gt, pred = _write_case_files(tmp_path, drop=(2, 6), extra=(99,))
  msg = _error(capsys, ["score", "--gt", str(gt), "--pred", str(pred), "--out",
                        str(tmp_path / "m.json")])
  assert "2 ids missing from the answers: 2, 6" in msg
  assert "1 ids not in the ground truth: 99" in msg
  assert not (tmp_path / "m.json").exists()


def test_score_errors_on_duplicates_and_bad_rows(tmp_path, capsys):
  gt, pred = _write_case_files(tmp_path)
  with open(pred, "a") as f:
    f.write(json.dumps({"question_id": 1, "text": "again"}) + "\n")
  assert re.search("duplicate_id.*'1'", _error(capsys, ["score", "--gt", str(gt), "--pred",
                                                         str(pred)]))
  pred.write_text('{"question_id": 1, "text": "yes"}\nnot json\n')
  msg = _error(capsys, ["score", "--gt", str(gt), "--pred", str(pred)])
  assert "malformed_json" in msg and f"line 2 column 1 ({pred})" in msg
  gt, pred = _write_case_files(tmp_path)  # fresh, valid files; then break one answer_type
  bad = json.loads(gt.read_text())
  bad[0]["answer_type"] = "MAYBE"
  gt.write_text(json.dumps(bad))
  assert re.search("answer_type.*'MAYBE'", _error(capsys, ["score", "--gt", str(gt), "--pred",
                                                           str(pred)]))


def test_table_prints_six_numbers_and_their_mean(tmp_path, capsys):
  files = {}
  for ds, (op, cl) in {"vqa_rad": (30.0, 60.0), "slake": (40.0, 50.0),
                       "path_vqa": (10.0, 70.0)}.items():
    files[ds] = tmp_path / f"{ds}.json"
    files[ds].write_text(json.dumps({"open_recall": op, "closed_accuracy": cl,
                                     "strict_open_accuracy": 1.0, "strict_closed_accuracy": 2.0}))
  vqa.main(["score", "--name", "ours", "--table"] + [f"{d}={p}" for d, p in files.items()])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split("|")[2:-1] == [" VQA-RAD Open ", " VQA-RAD Closed ", " SLAKE Open ",
                                      " SLAKE Closed ", " VQA-PATH Open ", " VQA-PATH Closed ",
                                      " Avg "]
  row = [c.strip() for c in lines[2].split("|")[1:-1]]
  # (30 + 60 + 40 + 50 + 10 + 70) / 6 = 43.33
  assert row == ["ours", "30.00", "60.00", "40.00", "50.00", "10.00", "70.00", "43.33"]
  strict = [c.strip() for c in lines[3].split("|")[1:-1]]
  assert strict[0] == "ours (strict exact match)" and strict[-1] == "1.50"


def test_table_end_to_end_from_score_output(tmp_path, capsys):
  gt, pred = _write_case_files(tmp_path)
  vqa.main(["score", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "m.json")])
  capsys.readouterr()
  vqa.main(["score", "--table", f"vqa_rad={tmp_path / 'm.json'}"])
  row = [c.strip() for c in capsys.readouterr().out.splitlines()[2].split("|")[1:-1]]
  # open 58.33, closed 25.00, mean (175/3 + 25) / 2 = 41.67
  assert row[1:] == ["58.33", "25.00", "41.67"]


def test_metrics_module_has_no_open_questions_value():
  agg = vqa_metrics.aggregate([score_one("CLOSED", "yes", "yes")])
  assert agg["open_recall"] is None and agg["n_open"] == 0 and agg["closed_accuracy"] == 100.0
