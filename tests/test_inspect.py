"""`python -m data.inspect`: its --json output is exactly what encode() gives the pipeline."""
import json
import os
import subprocess
import sys

import pytest

from data import conversation as C
from data import inspect as insp
from tiny_tokenizers import llama3_tokenizer, load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = [
    {"id": "pmc-1", "image": "a.jpg", "conversatons": [
        {"from": "human", "value": "What is shown?\n<image>"},
        {"from": "gpt", "value": "A chest X-ray with cardiomegaly."},
        {"from": "human", "value": "Is there a fracture?"}, {"from": "gpt", "value": "No."}]},
    {"id": "pmc-2", "conversations": []},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("insp")
  (d / "s.json").write_text(json.dumps(SAMPLES))
  return str(d / "s.json"), llama3_tokenizer(d)


def test_json_matches_encode(files):
  sample_file, tok_dir = files
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  res = subprocess.run([sys.executable, "-m", "data.inspect", "--tokenizer", tok_dir,
                        "--template", "vicuna_v1", "--sample", sample_file, "--image-tokens", "7",
                        "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  got = json.loads(res.stdout)
  assert set(got) == {"input_ids", "labels"}
  tok = load(tok_dir)
  want = C.encode(SAMPLES[0], tok, "vicuna_v1", image_tokens=7,
                  image_token_id=tok.convert_tokens_to_ids("<image>"))
  assert got["input_ids"] == want["input_ids"].tolist()
  assert got["labels"] == want["labels"].tolist()
  assert got["input_ids"].count(tok.convert_tokens_to_ids("<image>")) == 7


def test_render_counts_and_spans(files, capsys):
  sample_file, tok_dir = files
  assert insp.main(["--tokenizer", tok_dir, "--template", "llama3", "--sample", sample_file,
                    "--image-tokens", "4"]) == 0
  out = capsys.readouterr().out
  tok = load(tok_dir)
  enc = C.encode(SAMPLES[0], tok, "llama3", image_tokens=4,
                 image_token_id=tok.convert_tokens_to_ids("<image>"))
  n_train = int((enc["labels"] != -100).sum())
  assert f"tokens: {len(enc['input_ids'])}  trained: {n_train}" in out
  assert "image placeholders: 4" in out and "<image>x4" in out
  kinds = [k for k, _, _ in insp.spans(enc["input_ids"], enc["labels"],
                                        tok.convert_tokens_to_ids("<image>"))]
  assert kinds == ["masked", "image", "masked", "trained", "masked", "trained"]


def test_errors_exit_2(files, tmp_path, capsys):
  sample_file, tok_dir = files
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(SAMPLES[1:]))
  assert insp.main(["--tokenizer", tok_dir, "--template", "llama3", "--sample", str(bad)]) == 2
  err = capsys.readouterr().err
  assert "empty_conversation" in err and "pmc-2" in err
  no_image = llama3_tokenizer(tmp_path, image_token=False)
  assert insp.main(["--tokenizer", no_image, "--template", "llama3", "--sample", sample_file]) == 2
  assert "no <image> token" in capsys.readouterr().err
