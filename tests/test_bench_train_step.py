"""bench.train_step --smoke: both sides of a case run on tiny shapes and the table pairs them with
a ratio; a failing case becomes a note in the table instead of a crash."""
import re

import pytest

from bench import step_cases, train_step


def _rows(out: str) -> dict:
  """{(case label, side): cells} from the markdown table."""
  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 12 and cells[1] in step_cases.SIDES:
      rows[cells[0], cells[1]] = cells
  return rows


def _check_pair(rows, case, unit_col):
  label = step_cases.CASES[case]
  ours, ref = rows[label, "ours"], rows[label, "reference"]
  for r in (ours, ref):
    assert float(r[2]) > 0 and r[11] == "", r            # step seconds, no failure note
    assert float(r[unit_col].replace(",", "")) > 0, r    # tokens/s or images/s
    assert float(r[6]) > 0 and r[7].endswith("%"), r     # TFLOP/s and MFU
  assert re.fullmatch(r"\d+\.\d\dx", ours[10]), ours     # ours / reference
  assert ref[10] == ""
  return ours, ref


def test_smoke_keeps_explicit_flags_equal_to_defaults():
  """--smoke replaces only unset flags: `--loss-chunk 512` (the parser default) stays 512."""
  smoke = train_step.parse_args(["--smoke"])
  assert {k: getattr(smoke, k) for k in step_cases.SMOKE_FLAGS} == step_cases.SMOKE_FLAGS
  given = train_step.parse_args(["--smoke", "--loss-chunk", "512", "--steps=5", "--dtype",
                                 "bfloat16", "--micro-batch", "3"])
  assert (given.loss_chunk, given.steps, given.dtype, given.micro_batch) == (512, 5, "bfloat16", 3)
  assert (given.seq, given.warmup) == (step_cases.SMOKE_FLAGS["seq"], 1)
  assert train_step.parse_args(["--loss-chunk", "512"]).loss_chunk == 512


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
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
  for side in step_cases.SIDES:
    r = rows[step_cases.CASES["stage1"], side]
    assert r[2] == "-" and "ValueError: --seq 6 leaves no text" in r[11], r


@pytest.mark.slow   # ~10 s: two child processes; the default run checks the same through generate
def test_xla_flag_sets_each_run_in_their_own_process(capsys):
  # the unknown flag aborts only its own child (proof the set reached XLA); base still runs
  train_step.main(["--smoke", "--cases", "stage1", "--side", "ours", "--xla-flags", "base",
                   "bad=--xla_no_such_flag=1"])
  out = capsys.readouterr().out
  assert "## XLA flag A/B, (c) stage-1 step (connector), ours (smoke, CPU)" in out
  rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")]
                            for line in out.splitlines() if line.startswith("| "))}
  base, bad = rows["base"], rows["bad"]
  assert base[1] == "(none)" and float(base[3]) > 0 and base[5] == "1.00x" and base[8] == ""
  assert bad[1] == "`--xla_no_such_flag=1`" and bad[3] == "-"
  assert "Unknown flag in XLA_FLAGS: --xla_no_such_flag=1" in bad[8]


def test_xla_flag_set_names_and_environment():
  from bench import xla_flags
  assert xla_flags.parse("cublas_gemms") == ("cublas_gemms", "--xla_gpu_enable_triton_gemm=false")
  assert xla_flags.parse("mine=--xla_a=1 --xla_b=2") == ("mine", "--xla_a=1 --xla_b=2")
  for bad in ("no_such_set", "x=", "x=xla_a=1"):
    with pytest.raises(ValueError):
      xla_flags.parse(bad)
  env = xla_flags.environ("--xla_a=1", {"XLA_FLAGS": "--xla_z=0", "HOME": "/h"})
  assert env == {"XLA_FLAGS": "--xla_z=0 --xla_a=1", "HOME": "/h"}
  assert xla_flags.environ("", {})["XLA_FLAGS"] == ""
  argv = ["--cases", "llm", "--xla-flags", "base", "m=--xla_a=1", "--steps", "3"]
  assert train_step._without(argv, "--xla-flags") == ["--cases", "llm", "--steps", "3"]
