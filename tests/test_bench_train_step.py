"""bench.train_step --smoke: both sides of a case run on tiny shapes and the table pairs them with
a ratio; a failing case becomes a note in the table instead of a crash."""
import re

import pytest

from bench import train_step


def _rows(out: str) -> dict:
  """{(case label, side): cells} from the markdown table."""
  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 12 and cells[1] in train_step.SIDES:
      rows[cells[0], cells[1]] = cells
  return rows


def _check_pair(rows, case, unit_col):
  label = train_step.CASES[case]
  ours, ref = rows[label, "ours"], rows[label, "reference"]
  for r in (ours, ref):
    assert float(r[2]) > 0 and r[11] == "", r            # step seconds, no failure note
    assert float(r[unit_col].replace(",", "")) > 0, r    # tokens/s or images/s
    assert float(r[6]) > 0 and r[7].endswith("%"), r     # TFLOP/s and MFU
  assert re.fullmatch(r"\d+\.\d\dx", ours[10]), ours     # ours / reference
  assert ref[10] == ""
  return ours, ref


def test_smoke_stage1_and_vision(capsys):
  train_step.main(["--smoke", "--cases", "stage1", "vision"])
  out = capsys.readouterr().out
  assert "- command: `python -m bench.train_step --smoke --cases stage1 vision`" in out
  assert "- device: cpu" in out and "torch " in out and "jax " in out
  rows = _rows(out)
  assert len(rows) == 4
  ours, ref = _check_pair(rows, "stage1", 4)
  for r in (ours, ref):   # both sides train on the same batch from the same kind of init
    assert 4.0 < float(r[9]) < 7.0, r                     # loss near ln(256)
  ours, ref = _check_pair(rows, "vision", 5)
  assert ours[4] == ref[4] == "-" and ours[9] == "-"      # tower alone: images, no loss


@pytest.mark.slow
def test_smoke_lora_and_llm(capsys):
  train_step.main(["--smoke", "--cases", "lora", "llm"])
  rows = _rows(capsys.readouterr().out)
  _check_pair(rows, "lora", 4)
  ours, _ = _check_pair(rows, "llm", 4)
  assert ours[5] == "-"   # text only: no images/s


def test_failed_case_is_a_note(capsys):
  # 6 positions cannot hold BOS + 4 image features + text: both sides fail cleanly, the run goes on.
  train_step.main(["--smoke", "--cases", "stage1", "--seq", "6"])
  rows = _rows(capsys.readouterr().out)
  for side in train_step.SIDES:
    r = rows[train_step.CASES["stage1"], side]
    assert r[2] == "-" and "ValueError: --seq 6 leaves no text" in r[11], r
