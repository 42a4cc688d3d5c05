"""Every command line reports a malformed JSON / JSONL input the same way: one `error:` line naming
the file and the line, exit status 2 (data.errors.cli_errors), not a traceback and not a bare
json.JSONDecodeError that names no file. One malformed input per command; the commands run in this
process (their message is what matters, and each subprocess would cost seconds of imports)."""
import os

import pytest

# A JSON list whose 2nd element (on line 3) is broken, and JSON lines whose line 2 is.
BAD_LIST = '[\n  {"id": "a"},\n  {"id": "b",, "image": "x.png"}\n]\n'
BAD_LINES = '{"id": "a"}\n{"id": "b",, "image": "x.png"}\n'


def _convert(tmp):
  d = tmp / "hf"
  d.mkdir()
  (d / "config.json").write_text('{\n  "model_type": "llama",,\n  "hidden_size": 8\n}\n')
  from convert.cli import main
  return main, ["import", "--from", "hf", str(d), "--out", str(tmp / "ck")], d / "config.json", 2


def _vqa_score(tmp):
  from evaluation.vqa import main
  (tmp / "a.jsonl").write_text('{"question_id": "a", "text": "yes"}\n')
  return main, ["score", "--gt", str(tmp / "bad.json"), "--pred", str(tmp / "a.jsonl")], BAD_LIST


def _vqa_run(tmp):
  from evaluation.vqa import main
  return main, ["run", "--ckpt", str(tmp / "ckpt"), "--test-json", str(tmp / "bad.json"),
                "--image-root", str(tmp), "--out", str(tmp / "o.jsonl")], BAD_LIST


def _report(tmp):
  from evaluation.report import main
  (tmp / "a.jsonl").write_text('{"question_id": "a", "text": "yes"}\n')
  return main, ["--gt", str(tmp / "bad.jsonl"), "--pred", f"m={tmp / 'a.jsonl'}",
                "--out", str(tmp / "rep")], BAD_LINES


def _judge(tmp):
  from evaluation.judge import main
  return main, ["--questions", str(tmp / "bad.jsonl"), "--answers", str(tmp / "bad.jsonl"),
                "--out", str(tmp / "r.jsonl"), "--base-url", "http://127.0.0.1:9/v1",
                "--model", "m"], BAD_LINES


def _show_sample(tmp):
  from data.show_sample import main
  return main, ["--tokenizer", str(tmp), "--template", "llama3", "--sample",
                str(tmp / "bad.json")], BAD_LIST


def _synth(tmp):
  from data.synth import main
  (tmp / "figs.jsonl").write_text('{"pair_id": "a", "image": "a.png", "caption": "c"}\n'
                                  + BAD_LINES.splitlines()[1] + "\n")
  return main, ["--figures", str(tmp / "figs.jsonl"), "--out", str(tmp / "o.json"),
                "--endpoint", "a=http://127.0.0.1:9/v1,m"], tmp / "figs.jsonl", 2


def _ldrt(tmp):
  from data.ldrt import main
  (tmp / "figs").mkdir()
  (tmp / "figs" / "art.json").write_text(BAD_LIST)
  return main, ["--figures-dir", str(tmp / "figs"), "--out-dir", str(tmp / "o")], \
      tmp / "figs" / "art.json", 3


def _tfds(tmp):
  from data.tfds_builders.__main__ import main
  (tmp / "slake").mkdir()
  (tmp / "slake" / "train.json").write_text(BAD_LIST)
  return main, ["build", "slake", "--src", str(tmp / "slake"), "--out", str(tmp / "o")], \
      tmp / "slake" / "train.json", 3


def _validate(tmp):
  from train.validate import main
  (tmp / "cfg.py").write_text(
      "from configs import common\n"
      "def get_config():\n"
      "  c = common.base()\n"
      "  c.model.init = 'preset:llama3_med'\n"
      f"  c.data.update(paths=({str(tmp / 'bad.json')!r},), tokenizer_dir={str(tmp)!r})\n"
      "  return c\n")
  return main, ["--config", str(tmp / "cfg.py")], BAD_LIST


CASES = {"convert import": _convert, "evaluation.vqa score": _vqa_score,
         "evaluation.vqa run": _vqa_run, "evaluation.report": _report,
         "evaluation.judge": _judge, "data.show_sample": _show_sample, "data.synth": _synth,
         "data.ldrt": _ldrt, "data.tfds_builders build": _tfds, "train.validate": _validate}


@pytest.mark.parametrize("command", list(CASES))
def test_malformed_json_is_one_line_naming_file_and_line(command, tmp_path, capsys):
  main, argv, *where = CASES[command](tmp_path)
  if isinstance(where[0], str):   # the input is bad.json / bad.jsonl with this text
    name = "bad.json" if where[0] is BAD_LIST else "bad.jsonl"
    (tmp_path / name).write_text(where[0])
    where = [tmp_path / name, 3 if where[0] is BAD_LIST else 2]
  path, line = where
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2, err
  # the last line (a build may have drawn progress bars before it), and no traceback
  assert err[-1].startswith("error: ") and not any("Traceback" in x for x in err), err
  assert "[malformed_json]" in err[-1] and os.fspath(path) in err[-1], err
  assert f"line {line} column" in err[-1], err
