"""evaluation.judge: score parsing, relative scores, and the command against the loopback server."""
import json

import numpy as np
import pytest

from evaluation import judge
from llm_server import LLMServer, Reply, tag_of


def test_pairwise_parse_follows_llava():
  rule = judge.Rule.load("llava")
  assert rule.parse("8 7\nAssistant 1 is more detailed.") == ([8.0, 7.0], None)
  assert rule.parse("  8, 6.5\n") == ([8.0, 6.5], None)
  assert rule.parse("9\t 4") == ([9.0, 4.0], None)
  assert rule.parse("\n8 7\nwhy") == ([8.0, 7.0], None)  # LLaVA-Med strips the reply first
  for bad in ("Assistant 1: 8\nAssistant 2: 7", "8 7 6", "eight seven", "11 3", "0 5", "", "\n\n"):
    scores, why = rule.parse(bad)
    assert scores is None and why, bad


def test_single_parse_follows_ldrt_rule():
  rule = judge.Rule.load("ldrt")
  assert rule.kind == "single" and rule.score_range == [0, 10]
  for text, want in (("7\nGood.", 7.0), ("Score: 6/10\n", 6.0), ("0", 0.0), ("9.5.", 9.5)):
    assert rule.parse(text) == ([want], None), text
  for bad in ("A great answer.", "12", "7 8", "-1"):
    assert rule.parse(bad)[0] is None, bad


def test_summary_relative_scores_as_llava_and_llava_med():
  rows = [{"category": "conversation", "domain": "ct_scan", "scores": [8, 7]},
          {"category": "conversation", "domain": "mri", "scores": [6, 6]},
          {"category": "detailed_description", "domain": "ct_scan", "scores": [10, 5]},
          {"category": "detailed_description", "domain": "mri", "scores": None, "parse_error": "x"}]
  s = judge.summarize(rows, "pairwise")
  ref, model = np.array([8, 6, 10.]), np.array([7, 6, 5.])
  assert s["overall"]["n"] == 3 and s["overall"]["parse_failures"] == 1
  assert s["overall"]["relative_llava"] == pytest.approx(model.mean() / ref.mean() * 100)  # LLaVA: ratio of means
  assert s["overall"]["relative_llava_med"] == pytest.approx((model / ref).mean() * 100)  # LLaVA-Med: mean ratio
  assert s["overall"]["relative_llava"] != pytest.approx(s["overall"]["relative_llava_med"])
  assert s["ct_scan"]["reference_mean"] == 9 and s["ct_scan"]["model_mean"] == 6
  assert s["conversation"]["relative_llava_med"] == pytest.approx((7 / 8 + 1) / 2 * 100)
  assert s["mri"] == {"n": 1, "parse_failures": 1, "reference_mean": 6, "model_mean": 6, "relative_llava": 100,
                      "relative_llava_med": 100}
  single = judge.summarize([{"category": "detail", "scores": [2]}, {"category": "detail", "scores": [6]},
                            {"category": "complex", "scores": [7]}], "single")
  assert single["detail"]["mean"] == 4 and single["detail"]["std"] == 2
  assert single["overall"]["mean"] == pytest.approx(5) and single["overall"]["std"] == pytest.approx(np.std([2, 6, 7]))


def _llava_med_questions(path, n):
  """Rows in LLaVA-Med's llava_med_eval_qa50_qa.jsonl layout."""
  domains = ["chest_xray", "mri", "histology", "gross", "ct_scan"]
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({
          "question_id": i, "text": f"[[q{i}]] What is seen?", "fig_label": f"Figure {i}",
          "fig_caption": f"Caption {i}.",
          "in_text_mention": [{"tokens": f"Mention A{i} ( Figure {i} ) ."}, f"Mention B{i}"],
          "gpt4_answer": f"Reference answer {i}.", "type": ["conversation", "detailed_description"][i % 2],
          "domain": {d: d == domains[i % 5] for d in domains}}) + "\n")
  with open(path.with_name("answers.jsonl"), "w") as f:
    for i in range(n):
      f.write(json.dumps({"question_id": i, "text": f"Model answer {i}."}) + "\n")


def _pair_reply(req, attempt):
  i = int(tag_of(req)[1:])
  if i == 2 and attempt == 1:
    return Reply(status=500)
  if i == 4 and attempt == 1:
    return Reply(status=429, headers={"Retry-After": "0"})
  if i in (3, 6) and attempt == 1:
    return Reply("Assistant 1 scores 8 and Assistant 2 scores 6.\nBoth fine.")  # malformed first time
  return Reply(f"{8 + i % 3} {4 + i % 5}\nAssistant 1 is more precise.")


def test_judge_pairwise_records_failures_and_resumes(tmp_path, capsys):
  q = tmp_path / "questions.jsonl"
  _llava_med_questions(q, 8)
  out = tmp_path / "reviews.jsonl"
  base = ["--rule", "llava", "--questions", str(q), "--answers", str(tmp_path / "answers.jsonl"), "--out", str(out),
          "--model", "judge-70b", "--backoff", "0.001", "--concurrency", "3"]
  with LLMServer(_pair_reply) as srv:
    base += ["--base-url", srv.url]
    assert judge.main(base + ["--limit", "3"]) == 0
    first = [json.loads(line)["question_id"] for line in out.read_text().splitlines()]
    n_logged = len(srv.log)
    assert judge.main(base) == 0
    again = [e["tag"] for e in srv.log[n_logged:]]
    rows = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(first) == 3 and len(rows) == 8 == len(out.read_text().splitlines())  # no row twice, none lost
    assert not {f"q{i}" for i in first} & set(again)
    failed = sorted(k for k, r in rows.items() if r["parse_error"])
    assert failed == ["3", "6"] and all(rows[k]["scores"] is None and rows[k]["content"] for k in failed)
    assert all(r["scores"] == [8 + int(k) % 3, 4 + int(k) % 5] for k, r in rows.items() if k not in failed)
    assert rows["1"]["category"] == "detailed_description" and rows["1"]["domain"] == "mri"
    assert judge.main(base + ["--retry-failed"]) == 0
    assert sorted(e["tag"] for e in srv.log[len(srv.log) - 2:]) == ["q3", "q6"]
  rows = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert not any(r["parse_error"] for r in rows.values())
  summary = json.loads((tmp_path / "reviews.summary.json").read_text())["groups"]
  ref = np.array([8 + i % 3 for i in range(8)], float)
  model = np.array([4 + i % 5 for i in range(8)], float)
  assert summary["overall"]["n"] == 8
  assert summary["overall"]["relative_llava"] == pytest.approx(model.mean() / ref.mean() * 100)
  assert summary["overall"]["relative_llava_med"] == pytest.approx((model / ref).mean() * 100)
  assert "relative (LLaVA-Med)" in capsys.readouterr().err


def test_judge_prompt_layout(tmp_path):
  q = tmp_path / "questions.jsonl"
  _llava_med_questions(q, 1)
  msgs = judge.Rule.load("llava").messages(judge.load_questions(str(q))[0], "Model answer 0.")
  assert msgs[0] == {"role": "system",
                     "content": "You are a helpful and precise assistant for checking the quality of the answer."}
  c = msgs[1]["content"]
  order = ["[Context]\nFigure Caption:\nFigure 0: Caption 0.",
           "Figure Context:\n\t- Mention A0 ( Figure 0 ) .\n\t- Mention B0",
           "[Question]\n[[q0]] What is seen?", "[Assistant 1]\nReference answer 0.", "[End of Assistant 1]",
           "[Assistant 2]\nModel answer 0.", "[End of Assistant 2]", "[System]\nWe would like to request"]
  pos = [c.index(s) for s in order]
  assert pos == sorted(pos)
  assert "two values indicating the scores for Assistant 1 and 2" in c


def _single_reply(req, attempt):
  tag = tag_of(req)
  content = req["messages"][-1]["content"]
  assert "[Reference Answer]\nGT " in content and "Figure Context:\n\t- ctx" in content
  return Reply({"e0": "7\nok", "e1": "Score: 3/10\nweak", "e2": "Quite good overall.", "e3": "9"}[tag])


def test_judge_ldrt_single_scores_with_mean_std(tmp_path):
  q, a = tmp_path / "eval.jsonl", tmp_path / "pred.jsonl"
  with open(q, "w") as fq, open(a, "w") as fa:
    for i in range(4):  # the layout data.ldrt writes
      fq.write(json.dumps({"question_id": f"e{i}", "image": "x.png", "question": f"[[e{i}]] Describe.",
                           "answer": f"GT {i}", "caption": "Fig 1", "context": [f"ctx {i}"],
                           "category": ["detail", "complex"][i % 2]}) + "\n")
      fa.write(json.dumps({"question_id": f"e{i}", "text": f"pred {i}"}) + "\n")
  out = tmp_path / "r.jsonl"
  with LLMServer(_single_reply) as srv:
    assert judge.main(["--rule", "ldrt", "--questions", str(q), "--answers", str(a), "--out", str(out),
                       "--base-url", srv.url, "--model", "qwen2-72b"]) == 0
  rows = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert [rows[f"e{i}"]["scores"] for i in range(4)] == [[7.0], [3.0], None, [9.0]]
  assert rows["e2"]["parse_error"].startswith("first line is not one score")
  s = json.loads((tmp_path / "r.summary.json").read_text())["groups"]
  assert s["detail"] == {"n": 1, "parse_failures": 1, "mean": 7.0, "std": 0.0}
  assert s["complex"]["mean"] == 6.0 and s["complex"]["std"] == 3.0 and s["overall"]["n"] == 3


def test_judge_missing_answers_is_a_clear_error(tmp_path, capsys):
  q = tmp_path / "questions.jsonl"
  _llava_med_questions(q, 3)
  (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": 0, "text": "a"}) + "\n")
  with pytest.raises(SystemExit) as ei:
    judge.main(["--questions", str(q), "--answers", str(tmp_path / "answers.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
  assert ei.value.code == 2 and "2 question(s) have no answer" in capsys.readouterr().err
