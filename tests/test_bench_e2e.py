"""bench.train_e2e --smoke: the real training loop on synthetic on-disk data, then the same compiled
step on a device-resident batch; the result and the table report both rates and their quotient."""
import json
import math

import pytest

from bench import train_e2e


def _check(r, steps, warmup, batch, seq):
  assert r["grain_steps_per_s"] > 0 and r["resident_steps_per_s"] > 0, r
  assert math.isclose(r["ratio"], r["grain_steps_per_s"] / r["resident_steps_per_s"])
  assert r["steps"] == steps and r["warmup"] == warmup and r["run_steps"] == steps + warmup
  assert math.isclose(r["samples_per_s"], r["grain_steps_per_s"] * batch)
  assert r["recompiled"] is False                 # the run's own compiled step was reused
  assert math.isfinite(r["loss"]) and 0 < r["first_step_s"] < r["run_wall_s"]
  assert r["batch_shape"]["input_ids"] == [batch, seq]
  assert r["batch_shape"]["pixel_values"] == [batch, 1, 56, 56, 3]   # S2 28/56: the largest scale
  assert r["grain_busy_cores"] > 0 and r["resident_busy_cores"] > 0


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_smoke_json_and_table(capsys):
  argv = ["--smoke", "--steps", "2", "--warmup", "1", "--json"]
  r = train_e2e.main(argv)
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and json.loads(out[0]) == json.loads(json.dumps(r))   # one JSON line
  _check(r, steps=2, warmup=1, batch=2, seq=64)
  assert r["command"] == "python -m bench.train_e2e " + " ".join(argv)

  md = train_e2e.table(train_e2e.parse(argv[:-1]), r, argv[:-1])
  assert f"**ratio grain-fed / device-resident: {r['ratio']:.3f}**" in md
  assert "- command: `python -m bench.train_e2e --smoke --steps 2 --warmup 1`" in md
  assert f"| grain pipeline (train.trainer.run) | {r['grain_steps_per_s']:.3f} |" in md


@pytest.mark.slow
def test_smoke_with_grain_workers_and_full_stage2(capsys):
  r = train_e2e.main(["--smoke", "--steps", "2", "--warmup", "1", "--workers", "2", "--no-lora",
                      "--micro-batch", "4", "--json"])
  _check(r, steps=2, warmup=1, batch=4, seq=64)


def test_bad_step_counts_are_refused(capsys):
  with pytest.raises(SystemExit):
    train_e2e.main(["--smoke", "--warmup", "0"])
  assert "--steps and --warmup must be >= 1" in capsys.readouterr().err
