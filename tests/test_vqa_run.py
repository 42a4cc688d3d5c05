"""`python -m evaluation.vqa run`: answers every question of a TFDS build or a LLaVA-Med test.json,
in LLaVA-Med's row format, and resumes after an interruption without losing or repeating ids."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import tfds_builders as builders
from data.image import load_image
from evaluation import vqa
from tests.tiny_ckpt import shared_llava_checkpoint
from serve.generate import Generator
from serve.prompt import build_prompt
from tests.greedy import greedy_answer

QUESTIONS = [("Is there a fracture?", "yes"), ("Where is the lesion?", "left lung"),
             ("Is this normal?", "no"), ("What modality is this?", "CT"),
             ("How many nodules are seen?", "2")]
FLAGS = ["--slots", "2", "--max-new-tokens", "6"]


def png(seed, size=(30, 20)) -> bytes:
  b = io.BytesIO()
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(b, format="PNG")
  return b.getvalue()


def rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def answer_alone(ckpt, question, image):
  """The independent oracle (tests/greedy.py): a greedy loop over full forwards."""
  from tests.greedy import loaded
  model, _, tok = loaded(ckpt)
  return greedy_answer(ckpt, build_prompt(model.config, tok, question, [image]), 6)


@pytest.fixture(scope="module")
def ckpt():
  return shared_llava_checkpoint()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vqa_rad")
  src, out = tmp / "src" / "data", str(tmp / "tfds")
  src.mkdir(parents=True)
  for split, items in (("train", QUESTIONS[:1]), ("test", QUESTIONS)):
    pq.write_table(pa.table({
        "image": [{"bytes": png(i), "path": f"{i}.png"} for i in range(len(items))],
        "question": [q for q, _ in items], "answer": [a for _, a in items]}),
        src / f"{split}-00000-of-00001.parquet")
  builders.build("vqa_rad", str(src.parent), out)
  return out


def test_tfds_run_resumes_without_loss_or_duplicates(ckpt, tfds_dir, tmp_path):
  out, gt = str(tmp_path / "answers.jsonl"), str(tmp_path / "test.json")
  base = ["run", "--ckpt", ckpt, "--dataset", "vqa_rad", "--data-dir", tfds_dir, "--out", out,
          *FLAGS]
  vqa.main(base + ["--limit", "3", "--gt-out", gt])
  first = rows(out)
  ids = {f"test-{i:06d}" for i in range(5)}
  assert len(first) == 3 and {r["question_id"] for r in first} < ids
  # A kill in the middle of a write leaves a partial last line: it is dropped and redone.
  with open(out, "a") as f:
    f.write('{"question_id": "test-000003", "prompt": "What mod')
  vqa.main(base)
  done = rows(out)
  assert len(done) == 5 and {r["question_id"] for r in done} == ids  # every id, once
  assert done[:3] == first  # answered rows are kept as they were
  assert {r["prompt"] for r in done} == {q for q, _ in QUESTIONS}
  for r in done:
    assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert r["model_id"] == "ckpt" and r["text"]
  # Batched answers are the answers each question gets alone (right image, right question).
  last = next(r for r in done if r["prompt"] == QUESTIONS[4][0])
  assert last["text"] == answer_alone(ckpt, QUESTIONS[4][0], load_image(png(4)))
  vqa.main(base)  # nothing left to do: the file is unchanged
  assert rows(out) == done
  # The ground truth written beside the answers scores them.
  vqa.main(["score", "--gt", gt, "--pred", out, "--out", str(tmp_path / "m.json")])
  metrics = json.loads((tmp_path / "m.json").read_text())
  assert metrics["n_closed"] == 2 and metrics["n_open"] == 3


@pytest.fixture
def test_json(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  recs = []
  for i, (q, a) in enumerate(QUESTIONS[:3]):
    (root / f"img{i}.png").write_bytes(png(10 + i))
    text = f"<image>\n{q}" if i != 1 else f"{q}\n<image>"
    key = "conversatons" if i == 2 else "conversations"   # LLaVA-Med's known misspelling
    recs.append({"id": 100 + i, "image": f"img{i}.png", "answer_type": "CLOSED" if a in (
        "yes", "no") else "OPEN", key: [{"from": "human", "value": text},
                                        {"from": "gpt", "value": a}]})
  path = tmp_path / "test.json"
  path.write_text(json.dumps(recs))
  return path, root, recs


def test_llava_med_test_json(ckpt, test_json, tmp_path):
  path, root, _ = test_json
  out = str(tmp_path / "a.jsonl")
  vqa.main(["run", "--ckpt", ckpt, "--test-json", str(path), "--image-root", str(root),
            "--out", out, "--model-id", "tiny", *FLAGS])
  got = rows(out)
  assert [r["question_id"] for r in got] == [100, 101, 102]  # ids keep their JSON type
  assert [r["prompt"] for r in got] == [q for q, _ in QUESTIONS[:3]]
  assert {r["model_id"] for r in got} == {"tiny"}
  # The <image> marker after the question puts the image there.
  img = load_image(png(11))
  assert got[1]["text"] == answer_alone(ckpt, f"{QUESTIONS[1][0]}\n<image>", img)
  vqa.main(["score", "--gt", str(path), "--pred", out])


def test_ldrt_eval_rows_are_answered(ckpt, test_json, tmp_path):
  """data.ldrt's eval.jsonl rows (question_id, image, question, answer) are valid --test-json input."""
  _, root, recs = test_json
  flat = tmp_path / "eval.jsonl"
  flat.write_text("".join(json.dumps({"question_id": f"q{i}", "image": r["image"],
                                      "question": QUESTIONS[i][0], "answer": QUESTIONS[i][1]}) + "\n"
                          for i, r in enumerate(recs)))
  out = str(tmp_path / "a.jsonl")
  vqa.main(["run", "--ckpt", ckpt, "--test-json", str(flat), "--image-root", str(root),
            "--out", out, *FLAGS])
  got = rows(out)
  assert [r["question_id"] for r in got] == ["q0", "q1", "q2"]
  img = load_image(png(10))
  assert got[0]["text"] == answer_alone(ckpt, QUESTIONS[0][0], img)


def test_image_outside_root_fails_or_is_skipped(ckpt, test_json, tmp_path, capsys):
  path, root, recs = test_json
  recs[1]["image"] = "../secret.png"
  (tmp_path / "secret.png").write_bytes(png(0))
  path.write_text(json.dumps(recs))
  out = str(tmp_path / "a.jsonl")
  args = ["run", "--ckpt", ckpt, "--test-json", str(path), "--image-root", str(root),
          "--out", out, *FLAGS]
  with pytest.raises(SystemExit):
    vqa.main(args)
  assert re.search(r"path_escape.*\.\./secret\.png \(.*test\.json, sample 101\)$",
                   capsys.readouterr().err.strip())
  vqa.main(args + ["--lenient"])
  assert [r["question_id"] for r in rows(out)] == [100, 102]


def test_run_help():
  out = subprocess.run([sys.executable, "-m", "evaluation.vqa", "run", "--help"],
                       capture_output=True, text=True, check=True).stdout
  assert "--test-json" in out and "--max-new-tokens" in out and "--limit" in out


def test_inputs_are_checked_before_the_model_loads(ckpt, test_json, tmp_path, capsys,
                                                   monkeypatch):
  path, root, recs = test_json
  out = str(tmp_path / "a.jsonl")
  args = ["run", "--ckpt", ckpt, "--test-json", str(path), "--image-root", str(root),
          "--out", out, *FLAGS]

  def loaded(*a, **k):
    raise AssertionError("the model was loaded before the inputs were checked")

  def error(argv) -> str:
    with pytest.raises(SystemExit) as e:
      vqa.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: "), err
    return err

  with monkeypatch.context() as m:
    m.setattr(Generator, "from_checkpoint", loaded)
    recs[0]["conversations"][0]["value"] = "<image>\n   "
    path.write_text(json.dumps(recs))
    assert error(args).endswith(f"[empty_question] the question is empty ({path}, sample 100)")
    recs[0]["conversations"][0]["value"] = "<image>\nIs there a fracture?"
    recs[1]["image"] = "nope.png"
    path.write_text(json.dumps(recs))
    assert f"[missing_image] no image file nope.png under the image root {root} ({path}, " \
        "sample 101)" in error(args)
    recs[1]["image"] = "img1.png"
    path.write_text(json.dumps(recs))
    assert f"no such checkpoint dir or training workdir: {tmp_path / 'none'}" in error(
        args[:2] + [str(tmp_path / "none")] + args[3:])
    assert "is not a directory" in error(args[:6] + [str(tmp_path / "no_root")] + args[7:])
  # --lenient skips (and counts) such questions and answers the others
  recs[0]["conversations"][0]["value"] = ""
  recs[2]["image"] = "gone.png"
  path.write_text(json.dumps(recs))
  vqa.main(args + ["--lenient"])
  assert [r["question_id"] for r in rows(out)] == [101]
  assert '"skipped": 2' in capsys.readouterr().out


def test_training_workdir_as_ckpt(ckpt, test_json, tmp_path, capsys):
  """A chained train.main workdir stands for its last stage's final model."""
  path, root, _ = test_json
  work = tmp_path / "run"
  for stage, init in (("stage1", "scratch"), ("stage2", str(work / "stage1"))):
    (work / stage).mkdir(parents=True)
    (work / stage / "train_config.json").write_text(json.dumps({"model": {"init": init}}))
  os.symlink(ckpt, work / "stage2" / "final")
  out = str(tmp_path / "a.jsonl")
  vqa.main(["run", "--ckpt", str(work), "--test-json", str(path), "--image-root", str(root),
            "--out", out, *FLAGS])
  got = rows(out)
  assert len(got) == 3 and {r["model_id"] for r in got} == {"run"}
  assert f"model: {work / 'stage2' / 'final'}" in capsys.readouterr().err
