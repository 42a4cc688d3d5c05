"""`python -m data.show_sample`: its --json output is exactly what encode() gives the pipeline."""
import json
import os
import subprocess
import sys

import pytest

from data import conversation as C
from data import show_sample
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
  res = subprocess.run([sys.executable, "-m", "data.show_sample", "--tokenizer", tok_dir,
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
  assert show_sample.main(["--tokenizer", tok_dir, "--template", "llama3", "--sample", sample_file,
                    "--image-tokens", "4"]) == 0
  out = capsys.readouterr().out
  tok = load(tok_dir)
  enc = C.encode(SAMPLES[0], tok, "llama3", image_tokens=4,
                 image_token_id=tok.convert_tokens_to_ids("<image>"))
  n_train = int((enc["labels"] != -100).sum())
  assert f"tokens: {len(enc['input_ids'])}  trained: {n_train}" in out
  assert "image placeholders: 4" in out and "<image>x4" in out
  kinds = [k for k, _, _ in show_sample.spans(enc["input_ids"], enc["labels"],
                                        tok.convert_tokens_to_ids("<image>"))]
  assert kinds == ["masked", "image", "masked", "trained", "masked", "trained"]


def _error(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as e:
    show_sample.main(list(argv))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


def test_errors_exit_2(files, tmp_path, capsys):
  sample_file, tok_dir = files
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(SAMPLES[1:]))
  err = _error(capsys, "--tokenizer", tok_dir, "--template", "llama3", "--sample", str(bad))
  assert "empty_conversation" in err and "pmc-2" in err
  no_image = llama3_tokenizer(tmp_path, image_token=False)
  err = _error(capsys, "--tokenizer", no_image, "--template", "llama3", "--sample", sample_file)
  assert "no <image> token" in err


LONG_Q = ("Compare the opacity in the left lower lobe with the prior study and say whether the "
          "effusion has grown, stayed the same or resolved since then?")


def test_pick_by_id_or_index_and_keep_lines_whole(files, tmp_path, capsys):
  """--id / --index pick the sample; a long turn stays on one line when the output is piped."""
  tok_dir = files[1]
  rows = [{"id": 7, "conversations": [{"from": "human", "value": "Is this normal?"},
                                      {"from": "gpt", "value": "Yes."}]},
          {"id": "long", "conversations": [{"from": "human", "value": LONG_Q},
                                           {"from": "gpt", "value": "It has grown."}]},
          {"id": "last", "conversations": [{"from": "human", "value": "Is there a fracture?"},
                                           {"from": "gpt", "value": "No fracture."}]}]
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  base = ["--tokenizer", tok_dir, "--template", "llama3", "--sample", str(path)]
  assert len(LONG_Q) > 100
  for pick, want in ((["--id", "long"], LONG_Q), (["--id", "7"], "Is this normal?"),
                     (["--index", "-1"], "No fracture."), ([], "Is this normal?")):
    assert show_sample.main(base + pick) == 0
    out = capsys.readouterr().out
    assert any(want in line for line in out.splitlines()), (pick, out)   # never wrapped at 80
  assert "no sample with id 'x'" in _error(capsys, *base, "--id", "x")
  assert "--index 3 is out of range" in _error(capsys, *base, "--index", "3")
