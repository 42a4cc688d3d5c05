"""Faults a run meets outside its inputs, each ended in one line: a training checkpoint whose data
file was deleted or cut short (set aside, the run resumes from the newest readable step), a
damaged model dir (what is missing, which command rebuilds it), a full / read-only / forbidden disk
or too many open files at a writer, and Ctrl-C (exit 130). The checkpoints are real orbax OCDBT
files, damaged the way a crash or a full disk leaves them."""
import contextlib
import errno
import glob
import io
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data.errors import cli_errors
from tests.test_train_run import params_of, records, root, stage  # noqa: F401 (root: a fixture)
from train.checkpoints import Checkpoints
from vlm import checkpoint
from vlm.damage import DamagedCheckpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step: int) -> dict:
  rng = np.random.default_rng(step)   # random: the data file is not compressed to nothing
  return {"w": rng.standard_normal((96, 96)).astype(np.float32), "step": np.int32(step)}


def _saved_steps(d: str, steps=(1, 2)) -> str:
  ck = Checkpoints(d, every=1, keep=3, use_async=False)
  for s in steps:
    ck.save(s, _state(s), {"next": s})
  ck.close()
  return d


def _largest_data_file(step_dir: str) -> str:
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")),
             key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_an_unreadable_step_is_set_aside_and_the_run_resumes_from_the_step_before(
    damage, tmp_path, caplog):
  d = _saved_steps(str(tmp_path / "checkpoints"))
  bad = _largest_data_file(os.path.join(d, "2"))
  if damage == "truncated":
    os.truncate(bad, os.path.getsize(bad) // 2)
    what = rf"{re.escape(bad)} is truncated \(array piece w/0\.0 is cut off\)"
  else:
    os.remove(bad)
    what = (rf"a data file under {re.escape(d)}/2/state/ocdbt\.process_\*/d is missing "
            r"\(array piece w/0\.0\)")
  with caplog.at_level(logging.WARNING, "train.checkpoints"):
    ck = Checkpoints(d, every=1, keep=3, use_async=False)
  [line] = [r.getMessage() for r in caplog.records]
  assert re.fullmatch(rf"checkpoint of step 2 in {re.escape(d)} cannot be read: {what}; moved "
                      rf"to {re.escape(d)}/2\.unreadable, resuming from step 1", line), line
  assert ck.latest_step() == 1
  abstract = {k: np.zeros_like(v) for k, v in _state(1).items()}
  state, step = ck.restore(abstract)
  assert step == 1 and np.array_equal(state["w"], _state(1)["w"])
  assert ck.save(2, _state(2), {"next": 2}, force=True)   # the number is free again
  ck.close()
  assert sorted(os.listdir(d)) == ["1", "2", "2.unreadable"]


def test_no_readable_step_left_starts_from_zero_and_says_so(tmp_path, caplog):
  d = _saved_steps(str(tmp_path / "checkpoints"), steps=(3,))
  os.remove(os.path.join(d, "3", "state", "_METADATA"))
  with caplog.at_level(logging.WARNING, "train.checkpoints"):
    ck = Checkpoints(d, every=1, keep=3, use_async=False)
  assert [r.getMessage() for r in caplog.records] == [
      f"checkpoint of step 3 in {d} cannot be read: {d}/3/state/_METADATA is missing; moved to "
      f"{d}/3.unreadable, no older checkpoint: starting from step 0"]
  assert ck.latest_step() is None
  ck.close()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(root, caplog):
  """A data file of the newest step's OCDBT checkpoint cut short (as a full disk or a crash leaves
  it): the rerun says so in one line, sets the step aside and resumes from the step before, to
  the same model as the run that was never damaged."""
  from train import trainer
  c = stage("stage1", root, init=os.path.join(root, "init"), **{"eval.paths": ()})
  w = os.path.join(root, "damaged")
  trainer.run(c, w)
  whole = params_of(os.path.join(w, "final"))
  shutil.rmtree(os.path.join(w, "final"))
  os.remove(os.path.join(w, "summary.json"))
  ckpts = os.path.join(w, "checkpoints")
  bad = max(glob.glob(os.path.join(ckpts, "8", "state", "ocdbt.process_*", "d", "*")),
            key=os.path.getsize)
  os.truncate(bad, os.path.getsize(bad) // 2)
  with caplog.at_level(logging.WARNING, "train.checkpoints"):
    assert trainer.run(c, w)["step"] == 8
  [line] = [r.getMessage() for r in caplog.records if r.name == "train.checkpoints"]
  assert re.fullmatch(rf"checkpoint of step 8 in {ckpts} cannot be read: {bad} is truncated "
                      rf"\(array piece \S+ is cut off\); moved to {ckpts}/8\.unreadable, "
                      r"resuming from step 4", line), line
  assert [r["step"] for r in records(w)] == list(range(1, 9))   # steps 5-8 logged once
  again = params_of(os.path.join(w, "final"))
  assert whole.keys() == again.keys()
  for k in whole:
    np.testing.assert_array_equal(again[k], whole[k], err_msg=str(k))


# --- damaged model dirs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A training run's final/ (beside its train_config.json) of the demo architecture."""
  from configs import demo
  from tests import tiny_tokenizers
  from vlm.config import VLMConfig
  run = tmp_path_factory.mktemp("run")
  (run / "train_config.json").write_text("{}")
  tok = tiny_tokenizers.llama3_tokenizer(str(run / "tok"))
  cfg = VLMConfig.from_dict(dict(demo.ARCH, llm=dict(demo.ARCH["llm"], vocab_size=300)))
  rng = np.random.default_rng(0)   # a few arrays are enough: the files are what is damaged
  params = {"llm": {"embed": rng.standard_normal((300, 64)).astype(np.float32),
                    "norm": {"scale": np.ones(64, np.float32)}}}
  checkpoint.save(str(run / "final"), cfg, params, tok)
  shutil.rmtree(run / "tok")
  return str(run / "final")


def _damaged(model_dir, tmp_path, how: str) -> str:
  run = tmp_path / "run"
  shutil.copytree(os.path.dirname(model_dir), run)
  final = str(run / "final")
  if how == "no_params":
    shutil.rmtree(os.path.join(final, "params"))
  elif how == "truncated":
    f = max(glob.glob(os.path.join(final, "params", "ocdbt.process_*", "d", "*")),
            key=os.path.getsize)
    os.truncate(f, 100)
  else:   # corrupt bytes in the middle of every data file: only decoding finds them
    for f in glob.glob(os.path.join(final, "params", "ocdbt.process_*", "d", "*")):
      b = bytearray(pathlib.Path(f).read_bytes())
      b[64:-64] = bytes(x ^ 0x5A for x in b[64:-64])
      pathlib.Path(f).write_bytes(bytes(b))
  return final


REBUILD = ("delete {final} and rerun the python -m train.main command of {run}: it resumes from "
           "its newest checkpoint and writes the model again")


@pytest.mark.parametrize("how,what", [
    ("no_params", r"{final} has no params"),
    ("truncated", r"{final}/params/ocdbt\.process_0/d/\w+ is truncated \(array piece \S+ is cut "
                  r"off\)"),
    ("corrupt", r'{final}/params cannot be read \(\w+: Error reading "\S+" in OCDBT database at '
                r'local file "{final}/params/": .+\)')])
def test_a_damaged_model_dir_says_what_is_missing_and_how_to_rebuild_it(
    model_dir, tmp_path, how, what):
  import vlm
  final = _damaged(model_dir, tmp_path, how)
  want = (r"damaged checkpoint: " + what.format(final=re.escape(final)) + "; " +
          re.escape(REBUILD.format(final=final, run=os.path.dirname(final))))
  with pytest.raises(DamagedCheckpoint) as e:
    vlm.from_pretrained(final)
  assert re.fullmatch(want, str(e.value)), str(e.value)


def test_merge_lora_on_a_damaged_dir_is_one_line(model_dir, tmp_path, capfd):
  """No orbax thread tracebacks either (they were 21 of them)."""
  from convert.cli import main
  final = _damaged(model_dir, tmp_path, "corrupt")
  with pytest.raises(SystemExit) as e:
    main(["merge-lora", final, "--out", str(tmp_path / "merged")])
  err = capfd.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"error: damaged checkpoint: {final}/params cannot be read (")
  assert err.endswith(REBUILD.format(final=final, run=os.path.dirname(final)))


def test_serve_and_chat_on_a_final_without_params(model_dir, tmp_path, capfd):
  from serve import chat
  final = _damaged(model_dir, tmp_path, "no_params")
  want = (f"error: damaged checkpoint: {final} has no params; "
          + REBUILD.format(final=final, run=os.path.dirname(final)))
  for argv in (["--ckpt", os.path.dirname(final), "hi"], ["--ckpt", final, "hi"]):
    with pytest.raises(SystemExit) as e:
      chat.main(argv)
    assert e.value.code == 2 and capfd.readouterr().err.strip() == want, argv
  shutil.copytree(model_dir + "/params", final + "/params")   # the tokenizer missing instead
  shutil.rmtree(final + "/tokenizer")
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", final, "hi"])
  assert e.value.code == 2 and capfd.readouterr().err.strip() == want.replace("params", "tokenizer")


# --- OS errors at writers -----------------------------------------------------------------------

RERUN = "then rerun the command (training resumes from its newest checkpoint)"
OS_LINES = {
    errno.ENOSPC: ("no space left on device ({path}): free space or write to another disk, "
                   + RERUN),
    errno.EROFS: "read-only file system ({path}): choose an output path on a writable disk",
    errno.EACCES: "permission denied ({path}): fix its permissions or choose another path",
    errno.EMFILE: "too many open files ({path}): raise the limit (ulimit -n 65536) and rerun",
}


class _FailingFile(io.StringIO):
  """A file whose write fails as a full disk's does: OSError with no file name."""

  def __init__(self, name, code):
    super().__init__()
    self.name, self.code = name, code

  def write(self, _):
    raise OSError(self.code, os.strerror(self.code))


def _vqa_inputs(tmp_path):
  gt = tmp_path / "gt.json"
  gt.write_text(json.dumps([{"id": "q1", "answer_type": "CLOSED", "conversations": [
      {"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "yes"}]}]))
  pred = tmp_path / "pred.jsonl"
  pred.write_text('{"question_id": "q1", "text": "yes"}\n')
  return str(gt), str(pred)


def _report(tmp_path, out):
  from evaluation.report import main
  gt, pred = _vqa_inputs(tmp_path)
  gtl = tmp_path / "gt.jsonl"
  gtl.write_text('{"question_id": "q1", "answer": "yes it is"}\n')
  return main, ["--gt", str(gtl), "--pred", f"m={pred}", "--out", str(out)]


def _vqa_score(tmp_path, out):
  from evaluation.vqa import main
  gt, pred = _vqa_inputs(tmp_path)
  return main, ["score", "--gt", gt, "--pred", pred, "--out", str(out / "metrics.json")]


@pytest.mark.parametrize("code", list(OS_LINES))
@pytest.mark.parametrize("command", [_report, _vqa_score])
def test_a_failing_writer_is_one_line_naming_the_path(command, code, tmp_path, monkeypatch,
                                                      capsys):
  """Every writer: open() of an output raises (its file named), or a write to it does (no name:
  the file the failing code held is named)."""
  import builtins
  out = tmp_path / "out"
  out.mkdir()
  main, argv = command(tmp_path, out)
  real_open = builtins.open
  fails_at_write = code == errno.ENOSPC

  def failing_open(file, mode="r", *a, **kw):
    if str(file).startswith(str(out)) and any(m in mode for m in "wax"):
      if fails_at_write:
        return _FailingFile(str(file), code)
      raise OSError(code, os.strerror(code), str(file))
    return real_open(file, mode, *a, **kw)
  monkeypatch.setattr(builtins, "open", failing_open)
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err.strip()
  line = OS_LINES[code].format(path=f"{out}/" + r"\S+")
  assert e.value.code == 2 and re.fullmatch("error: " + re.escape(line).replace(
      re.escape(r"\S+"), r"\S+"), err), err


@contextlib.contextmanager
def _tmpfs(mnt, options: str):
  """A tmpfs mounted at `mnt` with these options; the test is skipped where mounting is not
  permitted (not root, a container without CAP_SYS_ADMIN)."""
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                     capture_output=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def full_disk(tmp_path):
  """A 256 KiB tmpfs, filled."""
  with _tmpfs(tmp_path / "full", "size=256k") as mnt:
    with open(mnt / "filler", "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"x" * 4096)
      except OSError:
        pass
    yield mnt


def test_a_real_full_disk_is_one_line_for_plain_and_orbax_writers(full_disk, tmp_path, capfd):
  main, argv = _vqa_score(tmp_path, full_disk)
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capfd.readouterr().err.strip()
  assert e.value.code == 2 and re.fullmatch(
      rf"error: no space left on device \({full_disk}/\S+\): free space or write to another "
      rf"disk, {re.escape(RERUN)}", err), err
  os.truncate(full_disk / "filler", os.path.getsize(full_disk / "filler") - 16 * 1024)
  big = {"w": np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)}
  with pytest.raises(SystemExit) as e:
    with cli_errors(debug=False):
      checkpoint.save_params(str(full_disk / "params"), big)
  err = capfd.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err   # no orbax thread tracebacks
  assert re.fullmatch(rf"error: no space left on device \({full_disk}/params\S*/d/\w+\): free "
                      rf"space or write to another disk, {re.escape(RERUN)}", err), err
  from safetensors.numpy import save_file   # convert export's writer: a Rust I/O error
  with pytest.raises(SystemExit) as e:
    with cli_errors(debug=False):
      save_file(big, str(full_disk / "model.safetensors"))
  assert e.value.code == 2 and capfd.readouterr().err.strip() == (
      f"error: no space left on device ({full_disk}/model.safetensors): free space or write to "
      f"another disk, {RERUN}")


def test_a_read_only_output_dir_is_one_line(tmp_path, capfd):
  with _tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
    main, argv = _report(tmp_path, mnt / "rep")
    with pytest.raises(SystemExit) as e:
      main(argv)
  err = capfd.readouterr().err.strip()
  assert e.value.code == 2 and err == (f"error: read-only file system ({mnt}/rep): choose an "
                                       "output path on a writable disk"), err


# --- Ctrl-C -------------------------------------------------------------------------------------

def test_ctrl_c_ends_any_command_with_one_line_and_130(capsys):
  with pytest.raises(SystemExit) as e:
    with cli_errors(debug=False):
      raise KeyboardInterrupt
  assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
  with pytest.raises(KeyboardInterrupt):   # MEDVLM_DEBUG / --debug keep the traceback
    with cli_errors(debug=True):
      raise KeyboardInterrupt


def test_ctrl_c_while_chat_loads_or_waits_at_its_prompt(model_dir, monkeypatch, capsys):
  """serve.chat through the central handling: Ctrl-C while the model loads, and at the prompt
  (the real signal: tests/test_faults.py::test_ctrl_c_at_the_chat_prompt_by_signal, slow)."""
  import vlm
  from serve import chat

  def interrupted(*a, **kw):
    raise KeyboardInterrupt
  monkeypatch.setattr(vlm, "from_pretrained", interrupted)
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", model_dir, "hi"])
  assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.slow
def test_ctrl_c_at_the_chat_prompt_by_signal(tmp_path):
  import signal
  from tests.tiny_ckpt import shared_llava_checkpoint
  proc = subprocess.Popen([sys.executable, "-m", "serve.chat", "--ckpt",
                           shared_llava_checkpoint()], cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert proc.stdout.read(4) == b">>> "   # loaded, waiting for a question
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and err.decode().strip() == "interrupted", err


# --- point 5: the one line of each command ------------------------------------------------------

def test_serve_refuses_a_busy_port_before_it_loads_anything(tmp_path, capsys):
  import socket
  from serve.__main__ import main
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(SystemExit) as e:   # --ckpt does not exist: the port is checked first
      main(["--ckpt", str(tmp_path / "nowhere"), "--port", str(port)])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err == (f"error: cannot listen on 127.0.0.1:{port}: Address "
                                       "already in use; stop what uses it or pass another --port")


def test_chat_on_a_llava_code_base_dir_names_the_convert_command(tmp_path, capsys):
  from serve import chat
  d = tmp_path / "llava-med"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "llava_mistral",
                                             "mm_vision_tower": "openai/clip-vit-large"}))
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(d), "hi"])
  assert e.value.code == 2 and capsys.readouterr().err.strip() == (
      f"error: {d} is a LLaVA code-base model (mm_* keys in config.json): convert it first: "
      f"python -m convert import --from llava {d} --out DIR, then pass DIR")


def test_show_sample_errors_name_the_folder_or_file(tmp_path, capsys):
  from data.show_sample import main
  from tests import tiny_tokenizers
  sample = tmp_path / "s.json"
  sample.write_text(json.dumps([{"id": "a", "conversations": [
      {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
  tok = tiny_tokenizers.llama3_tokenizer(str(tmp_path / "t"))
  no_image = tiny_tokenizers.llama3_tokenizer(str(tmp_path / "t2"), image_token=False)
  cases = [
      (str(tmp_path), f"error: {tmp_path} is not a tokenizer dir (none of tokenizer.json, "
       "tokenizer_config.json, tokenizer.model, vocab.json); pass a HF tokenizer dir or a "
       "checkpoint dir holding tokenizer/", []),
      (str(tmp_path / "nope"), f"error: tokenizer dir not found: {tmp_path / 'nope'}", []),
      (no_image, f"error: the tokenizer in {no_image} has no <image> token; add it as a special "
       "token", []),
      (tok, f"error: [too_long] no trained token left within max_len 3 ({sample}, sample 'a')",
       ["--max-len", "3"]),
  ]
  for where, want, extra in cases:
    with pytest.raises(SystemExit) as e:
      main(["--tokenizer", where, "--template", "llama3", "--sample", str(sample), *extra])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == want


def test_validate_says_a_folder_is_not_a_tokenizer_without_hub_words(tmp_path, capsys):
  from train.validate import main
  data = tmp_path / "d.json"
  data.write_text(json.dumps([{"id": "a", "conversations": [
      {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
  (tmp_path / "cfg.py").write_text(
      "from configs import common\n"
      "def get_config():\n"
      "  c = common.base()\n"
      "  c.model.init = 'preset:llama3_med'\n"
      f"  c.data.update(paths=({str(data)!r},), tokenizer_dir={str(tmp_path)!r})\n"
      "  return c\n")
  with pytest.raises(SystemExit) as e:
    main(["--config", str(tmp_path / "cfg.py")])
  err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress bar
  assert e.value.code == 2 and err == (
      f"error: {tmp_path} is not a tokenizer dir (none of tokenizer.json, tokenizer_config.json, "
      "tokenizer.model, vocab.json); pass a HF tokenizer dir or a checkpoint dir holding "
      "tokenizer/"), err


def test_an_undecodable_upload_is_named_without_python_reprs():
  from data.errors import BadSample
  from data.image import load_image
  with pytest.raises(BadSample) as e:
    load_image(b"\x89PNG not really")
  assert str(e.value) == ("[corrupt_image] cannot decode image: UnidentifiedImageError: cannot "
                          "identify image file")
