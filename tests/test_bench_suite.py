"""bench.suite: stages run in order under a hard deadline; each stage's status, results and output
are written as it ends; a stage that fails, hangs or does not fit is recorded and the run goes on;
a killed stage's partial JSON results still make its table. Also the ablation flags it relies on
in bench.train_step."""
import argparse
import json
import os
import sys
import time

import pytest

from bench import (step_ablations, step_cases, step_tables, suite, suite_report, suite_stages,
                   train_step)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _stage(name, estimate=0.1, timeout=60, render=""):
  return suite_stages.Stage(name, 1, f"test stage {name}", ("bench.nothing",), estimate, timeout,
                     render=render)


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_smoke_stage_writes_results_log_and_summary(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  suite.main(["--out", str(out), "--work", str(work), "--budget", "200", "--smoke",
              "--stages", "gen-b32"])
  rows = _lines(out / "results.jsonl")
  assert rows[0]["kind"] == "env" and rows[0]["versions"]["jax"]
  stage = rows[1]
  assert stage["kind"] == "stage" and stage["stage"] == "gen-b32" and stage["status"] == "ok"
  assert stage["command"] == "python -m bench.generate --smoke --impl jax" and stage["wall_s"] > 0
  results = [r for r in rows if r["kind"] == "result"]
  assert results and all(r["stage"] == "gen-b32" and r["decode_tok_s"] > 0 for r in results)
  log = (out / "log.txt").read_text()
  assert "=== gen-b32" in log and '"decode_tok_s"' in log        # the child's own output
  md = (out / "summary.md").read_text()
  assert "| gen-b32 | #10 acc. 6: generation, batch 32" in md and "| ok |" in md
  assert "## Generation benchmark" in md and "| jax | 2 |" in md
  assert "Command: `python -m bench.generate --smoke --impl jax`" in md


def test_budget_skips_stages_with_a_reason_and_part2_takes_them_over(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  t = time.monotonic()
  suite.main(["--out", str(out), "--work", str(work), "--budget", "30", "--part", "1"])
  assert time.monotonic() - t < 20       # nothing started: every estimate exceeds 30 - 5 s
  stages = [r for r in _lines(out / "results.jsonl") if r["kind"] == "stage"]
  part1 = [s.name for s in suite_stages.STAGES if s.part == 1]
  assert [r["stage"] for r in stages] == part1
  for r in stages:
    assert r["status"] == "skipped" and r["wall_s"] is None
    assert r["reason"].startswith(f"needs ~{r['estimate_s']:.0f} s by its estimate"), r
  md = (out / "summary.md").read_text()
  assert md.count("| skipped |") == len(part1) and "by its estimate" in md
  # part 2 on the same machine first runs what part 1 skipped, then its own stages
  part2 = [s.name for s in suite.plan("2", work=str(work))]
  assert part2 == part1 + [s.name for s in suite_stages.STAGES if s.part == 2]
  assert [s.name for s in suite.plan("2", work=str(tmp_path / "fresh"))] == part2[len(part1):]


def test_failure_and_timeout_are_recorded_and_the_run_goes_on(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  # a train_step-like result on stderr, then a grandchild and a hang: the group is killed
  hang = ("import json, subprocess, sys, time\n"
          "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
          "print(json.dumps({'case': 'llm', 'side': 'ours', 'tokens': 16384, 'images': 0,"
          " 'flops': 2e15, 'first_s': 50.0, 'step_s': 1.5, 'peak': 2 ** 34, 'loss': 11.9,"
          " 'device': 'NVIDIA H200 (gpu)', 'grandchild': g.pid}), file=sys.stderr, flush=True)\n"
          "time.sleep(60)\n")
  fail = "import sys; print('boom: no GPU', file=sys.stderr); sys.exit(3)"
  good = "print('| a | b |')"
  stages = [_stage("hang", timeout=2, render="train_step"), _stage("fail"), _stage("good")]
  cmds = {"hang": [sys.executable, "-c", hang], "fail": [sys.executable, "-c", fail],
          "good": [sys.executable, "-c", good]}
  t = time.monotonic()
  rows = suite.run(stages, str(out), 60, work=str(work), commands=cmds, log=lambda m: None)
  assert time.monotonic() - t < 20
  assert [r["status"] for r in rows] == ["timeout", "failed", "ok"]
  assert rows[0]["reason"] == "killed after 2 s" and rows[1]["rc"] == 3
  assert "boom: no GPU" in rows[1]["note"]
  saved = _lines(out / "results.jsonl")
  partial = [r for r in saved if r.get("kind") == "result" and r["stage"] == "hang"]
  assert len(partial) == 1 and partial[0]["step_s"] == 1.5      # kept though the stage was killed
  pid = partial[0]["grandchild"]
  try:   # the benchmark's own child died with its group (at most a zombie awaiting its reaper)
    with open(f"/proc/{pid}/stat") as f:
      assert f.read().split(")")[-1].split()[0] in ("Z", "X")
  except FileNotFoundError:
    pass
  md = (out / "summary.md").read_text()
  assert "| hang | test stage hang | timeout |" in md
  assert "| (b) LLM alone, LoRA | ours | 1.5000 |" in md      # bench.train_step's own table
  assert "| good |" in md and "| a | b |" in md


def test_global_deadline_cuts_the_last_stage_short(tmp_path):
  sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
  stages = [_stage("slow", estimate=1, timeout=100), _stage("next", estimate=1)]
  t = time.monotonic()
  rows = suite.run(stages, str(tmp_path), suite.RESERVE_S + 3, work=str(tmp_path / "w"),
                   commands={"slow": sleep, "next": sleep}, log=lambda m: None)
  assert time.monotonic() - t < suite.RESERVE_S + 10
  assert rows[0]["status"] == "timeout" and rows[0]["timeout_s"] <= 3
  assert rows[1]["status"] == "skipped" and "budget left" in rows[1]["reason"]


def test_train_step_ablation_flags():
  assert step_ablations.variant("base") == {}
  assert step_ablations.variant("remat=none,loss_chunk=0") == {"remat": "none", "loss_chunk": 0}
  assert step_ablations.variant("frozen-dtype=float32") == {"frozen_dtype": "float32"}
  assert step_ablations.variant("lora_dropout=0") == {"lora_dropout": 0.0}
  for bad in ("remat=sometimes", "lr=1", "remat"):
    with pytest.raises(argparse.ArgumentTypeError):
      step_ablations.variant(bad)
  args = train_step.parser().parse_args(["--cases", "llm", "--layers", "4", "--ablate", "base",
                                         "loss_chunk=0", "--compile-threads", "2"])
  assert args.layers == 4 and args.frozen_dtype is None
  assert step_cases.arch(args, "llm").llm.layers == 4
  settings = dict(remat="full", attention="cudnn", loss_chunk=512, frozen_dtype="bfloat16")
  rows = [{"case": "llm", "side": "ours", "variant": "base", "settings": settings,
           "tokens": 16384, "compile_s": 30.0, "step_s": 0.25, "compiled_args": 2 ** 31,
           "compiled_temp": 3 * 2 ** 30, "loss": 11.9, "device": "NVIDIA H200 (gpu)"},
          {"case": "llm", "side": "ours", "variant": "loss_chunk=0",
           "settings": dict(settings, loss_chunk=0), "tokens": 16384, "compile_s": 28.0,
           "step_s": 0.5, "compiled_temp": 9 * 2 ** 30, "loss": 11.9},
          {"case": "llm", "side": "ours", "variant": "attention=cudnn", "settings": settings,
           "note": "same settings as base"}]
  md = step_tables.ablation_table(args, rows, ["--ablate", "base"])
  assert "4 decoder layers (reduced depth, same widths)" in md and "NVIDIA H200" in md
  assert "| base | full | cudnn | 512 | bfloat16 | 30.0 | 0.2500 | 65,536 | 1.00x | 2 | 3 |" in md
  assert "| loss_chunk=0 | full | cudnn | 0 | bfloat16 | 28.0 | 0.5000 | 32,768 | 2.00x | - | 9 |" in md
  assert md.rstrip().endswith("| same settings as base |")


def test_killed_xla_flags_stage_still_renders_its_table():
  stage = suite_stages.BY_NAME["xla-flags"]
  cmd = suite_stages.command(stage, False, "/w")
  rec = {"case": "llm", "side": "ours", "tokens": 16384, "compile_s": 40.0, "step_s": 0.3,
         "peak": 2 ** 33, "loss": 11.9, "device": "NVIDIA H200 (gpu)"}
  records = [dict(rec, variant="base", xla_flags=""),
             dict(rec, variant="cublas_gemms", xla_flags="--xla_gpu_enable_triton_gemm=false",
                  step_s=0.27)]
  md = suite_report.partial_table(stage, cmd, records)
  assert "## XLA flag A/B, (b) LLM alone, LoRA, ours (GPU)" in md and "4 decoder layers" in md
  assert "| base | (none) | 40.0 | 0.3000 | 54,613 | 1.00x | 8.0 | 11.900 |  |" in md
  assert "| cublas_gemms | `--xla_gpu_enable_triton_gemm=false` | 40.0 | 0.2700 |" in md
  assert "| 0.90x |" in md


def test_device_wheels_pinned_and_fetch_script_matches_the_readme():
  root = os.path.dirname(os.path.dirname(os.path.abspath(suite.__file__)))
  with open(os.path.join(root, "bench", "device_wheels.txt")) as f:
    pins = [l.split("#")[0].strip() for l in f if l.split("#")[0].strip()]
  assert pins and all("==" in p for p in pins)
  names = {p.split("==")[0].lower() for p in pins}
  assert {"ml-collections", "grain"} <= names
  with open(os.path.join(root, "requirements.txt")) as f:
    req = {l.split("==")[0].strip().lower(): l.strip() for l in f if "==" in l}
  for p in pins:   # the same versions as the project's pins, where it pins them
    name = p.split("==")[0].lower()
    assert req.get(name, p) == p, (p, req.get(name))
  with open(os.path.join(root, "bench", "fetch_wheels.sh")) as f:
    script = f.read()
  for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--implementation cp",
               "--platform manylinux_2_28_x86_64", "--platform manylinux2014_x86_64"):
    assert flag in script


def test_a_stage_train_aot_found_too_big_is_skipped(tmp_path):
  from bench import suite_aot
  work = tmp_path / "w"
  work.mkdir()
  (work / "aot.jsonl").write_text(json.dumps(
      {"stage": "big", "target": "h200", "fits": False, "peak": 150 * 2**30,
       "limit": 105 * 2**30}) + "\n" + json.dumps({"stage": "small", "fits": True}) + "\n")
  ok = [sys.executable, "-c", "pass"]
  rows = suite.run([_stage("big"), _stage("small")], str(tmp_path), 60, work=str(work),
                   commands={"big": ok, "small": ok}, log=lambda m: None)
  assert [r["status"] for r in rows] == ["skipped", "ok"]
  assert rows[0]["reason"] == "does not fit on h200 by train.aot (peak 150.0 GiB of 105.0 GiB)"


def test_aot_check_builds_the_stage_config_bench_runs():
  from bench import suite_aot
  c = suite_aot.stage_config("lora")
  assert (c.data.global_batch, c.data.max_len, c.model.lora.rank) == (8, 2048, 128)
  assert c.data.max_images_per_row == 1 and c.model.remat == "full"
  assert suite_aot.stage_config("llm").data.max_images_per_row == 0
  assert suite_aot.stage_config("attention") is None and suite_aot.stage_config("ablations") is None
