"""`python -m serve.chat`: streams the answer the model gives for a DICOM or PNG image, keeps the
conversation, and checks its inputs before the model loads."""
import io
import json
import os
import subprocess
import sys

import functools

import jax
import numpy as np
import pydicom.data
import pytest
from PIL import Image

import vlm
from data.conversation import stop_token_ids
from data.image import load_image
from data.tokenizer import load_tokenizer
from tests.tiny_ckpt import shared_llava_checkpoint
from serve import chat
from serve.generate import Generator
from serve.prompt import build_prompt
from tests.greedy import greedy_answer as oracle, loaded as _loaded

DICOM = pydicom.data.get_testdata_file("CT_small.dcm")
MAX_NEW = 12


@pytest.fixture(scope="module")
def ckpt():
  return shared_llava_checkpoint()


@pytest.fixture(scope="module")
def png(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "slide.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
  return str(path)


def greedy_answer(ckpt, prompt):
  return oracle(ckpt, prompt, MAX_NEW)


def expected(ckpt, image_path, question):
  model, _, tok = _loaded(ckpt)
  prompt = build_prompt(model.config, tok, question, [load_image(image_path)])
  text = greedy_answer(ckpt, prompt)
  assert text, "the tiny model should say something for this prompt"
  return text


@pytest.mark.parametrize("image", ["dicom", "png"])
def test_one_question_streams_the_answer(ckpt, png, image, capsys):
  path = DICOM if image == "dicom" else png
  chat.main(["--ckpt", ckpt, "--image", path, "--max-new-tokens", str(MAX_NEW),
             "What is shown in the image?"])
  out = capsys.readouterr().out
  assert out.endswith("\n") and out.strip() == expected(ckpt, path, "What is shown in the image?")


def expected_turns(ckpt, image_path, questions):
  """The answers of a conversation, each turn rendered with the earlier ones as history."""
  model, _, tok = _loaded(ckpt)
  history = []
  for q in questions:
    prompt = build_prompt(model.config, tok, q, [load_image(image_path)], history=history)
    history.append((q, greedy_answer(ckpt, prompt)))
  return [a for _, a in history]


def test_interactive_loop_keeps_the_conversation(ckpt, png):
  args = chat._parser().parse_args(["--ckpt", ckpt, "--image", DICOM,
                                    "--max-new-tokens", str(MAX_NEW)])
  session = chat.Chat(args)
  inp = io.StringIO("Is there a fracture?\nWhere?\n\n/reset\nWhere?\n/image missing.png\n"
                    f"/image {png}\nIs there a fracture?\n/quit\nnot asked\n")
  out = io.StringIO()
  chat.interactive(session, inp, out)
  turns = [t.strip() for t in out.getvalue().split(chat.PROMPT)]
  first, second = expected_turns(ckpt, DICOM, ["Is there a fracture?", "Where?"])
  assert turns[1:4] == [first, second, ""]    # a blank line asks nothing
  assert turns[4] == "(new conversation)" and turns[5] == expected(ckpt, DICOM, "Where?")
  assert second != turns[5]   # the history changed the answer
  assert "error: [missing_image]" in turns[6] and "missing.png" in turns[6]
  assert turns[7] == "(image loaded; new conversation)"
  assert turns[8] == expected(ckpt, png, "Is there a fracture?")
  assert len(turns) == 10 and turns[9] == ""  # /quit ends the loop before "not asked"


def test_inputs_are_checked_before_the_model_loads(ckpt, png, tmp_path, monkeypatch, capsys):
  """#16: one `error: ...` line and exit status 2, before any weight is read."""
  def no_load(*a, **k):
    raise AssertionError("the model was loaded before the inputs were checked")
  monkeypatch.setattr(Generator, "from_checkpoint", no_load)
  bad = tmp_path / "scan.dcm"
  bad.write_bytes(b"not a dicom")
  cases = [(ckpt, png, "  ", "the question is empty"),
           (ckpt, png, "", "the question is empty"),
           (ckpt, str(tmp_path / "nope.png"), "q", "[missing_image]"),
           (ckpt, str(bad), "q", "[corrupt_image]"),
           (str(tmp_path), png, "q", "is neither a checkpoint"),
           (str(tmp_path / "absent"), png, "q", "no such checkpoint dir")]
  for where, image, question, message in cases:
    with pytest.raises(SystemExit) as e:
      chat.main(["--ckpt", where, "--image", image, question])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err, (message, err)
    assert len(err.strip().splitlines()) == 1


def test_a_training_workdir_resolves_to_its_last_stage(ckpt, png, tmp_path, capsys):
  """A chained train.main workdir stands for its last stage's final/ (the stage no other starts
  from), as serve.workdir.resolve lays it out."""
  run = tmp_path / "run"
  old = run / "stage1" / "final"
  (old / "params").mkdir(parents=True)
  (old / "config.json").write_text("{}")
  (run / "stage1" / "train_config.json").write_text(json.dumps({"model": {"init": "x"}}))
  (run / "stage2").mkdir()
  (run / "stage2" / "train_config.json").write_text(
      json.dumps({"model": {"init": str(run / "stage1")}}))
  os.symlink(ckpt, run / "stage2" / "final")
  chat.main(["--ckpt", str(run), "--image", png, "--max-new-tokens", str(MAX_NEW), "Describe."])
  assert capsys.readouterr().out.strip() == expected(ckpt, png, "Describe.")


def test_module_help():
  out = subprocess.run([sys.executable, "-m", "serve.chat", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "--temperature" in out and "--top-p" in out and "--max-new-tokens" in out


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_second_run_loads_its_programs_from_the_compilation_cache(ckpt, png, tmp_path):
  """vlm/compile_cache.py: the CLI keeps its compiled programs on disk; a rerun of the same
  question loads them (JAX logs each hit with log_compiles) and answers the same."""
  import os
  cache = tmp_path / "xla"
  env = dict(os.environ, MEDVLM_COMPILE_CACHE=str(cache), JAX_LOG_COMPILES="1",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # every program is kept
  cmd = [sys.executable, "-m", "serve.chat", "--ckpt", ckpt, "--image", png, "--max-new-tokens",
         str(MAX_NEW), "What is shown in the image?"]
  first = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  entries = sorted(p.name for p in cache.iterdir())
  assert entries and "Persistent compilation cache hit" not in first.stderr
  second = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  assert second.stdout == first.stdout and second.stdout.strip()
  for program in ("jit__prefill", "jit__generate"):   # serve/programs.py's
    assert f"Persistent compilation cache hit for '{program}'" in second.stderr, second.stderr
  assert sorted(p.name for p in cache.iterdir()) == entries      # nothing compiled anew


def test_compilation_cache_directory_choice(monkeypatch, tmp_path):
  import jax
  from vlm import compile_cache
  old = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.setenv("MEDVLM_COMPILE_CACHE", "off")
    assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir == old
    monkeypatch.delenv("MEDVLM_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.enable() == str(tmp_path / "medvlm-jax" / "xla")
    monkeypatch.setenv("MEDVLM_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache.enable() == str(tmp_path / "medvlm-jax" / "xla")   # JAX's choice stands
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable() == str(tmp_path / "mine")
  finally:
    jax.config.update("jax_compilation_cache_dir", old)
