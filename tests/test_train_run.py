"""Whole training runs (train/main.py, train/trainer.py, train/checkpoints.py, train/metrics.py) on
the synthetic demo data with a tiny VLM: both stages chained with checkpoints, metrics.jsonl,
TensorBoard files and loadable final models; exact resume after SIGTERM and SIGKILL with each step
logged once; the abort after M non-finite steps; all-bad data stopped at once, short runs and
finished stages told apart by the completion record; user errors in one line; two CPU processes =
one 8-device process (slow); the demo command (slow). A damaged newest checkpoint:
tests/test_faults.py."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import vlm
from configs import demo
from data.errors import UserError, cli_errors
from train import demo as demo_data
from train import main as train_main
from train import trainer
from train.source import source_config
from vlm import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for this module's runs and its subprocesses: the same
  programs are compiled once."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs,
         jax.config.jax_persistent_cache_min_entry_size_bytes)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
  cc.reset_cache()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Demo data + tokenizer, and a random starting checkpoint of the demo architecture (written
  from numpy, so frozen weights can be compared bit for bit)."""
  d = str(tmp_path_factory.mktemp("train"))
  demo_data.prepare(d, train_views=10, test_views=4)
  c = stage("stage1", d, init="scratch")
  cfg = source_config(c)
  from vlm.model import abstract_params
  rng = np.random.default_rng(0)
  flat = flatten_dict(abstract_params(cfg, boxed=False))
  params = {k: (np.ones(v.shape, np.float32) if k[-1] == "scale" else
                (rng.standard_normal(v.shape) * 0.1).astype(np.float32)) for k, v in flat.items()}
  from flax.traverse_util import unflatten_dict
  checkpoint.save(os.path.join(d, "init"), cfg, unflatten_dict(params),
                  os.path.join(d, "data", "tokenizer"))
  return d


def stage(name, d, *, init, steps=8, **kw):
  c = demo.stage(name)
  if name == "stage1":
    c.model.arch = demo.ARCH
    c.data.template = "plain"
    c.data.max_len, c.data.pad_buckets = 48, (48,)
    c.trainable = (r"^connector/", r"^llm/(embed|norm|lm_head)")
    c.optim.lr = 1e-2
  else:
    c.trainable = (r"^connector/", r"^llm/")
    c.optim.lr = 3e-3
  c.model.init = init
  c.data.global_batch = 8
  c.train.update(steps=steps, log_every=1)
  c.optim.grad_accum = 1
  c.eval.update(every=4, batches=1)
  c.checkpoint.update(every=4, keep=2)
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  train_main.fill_workdir(c, d)
  return c


def records(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def params_of(path):
  return flatten_dict(jax.tree_util.tree_map(np.asarray, checkpoint.load(path)[1]))


def test_two_stages_chain_and_write_checkpoints_metrics_tensorboard(root):
  run = os.path.join(root, "chain")
  c = ml_collections.ConfigDict()
  c.name, c.chain = "chain", ("stage1", "stage2")
  c.stage1 = stage("stage1", root, init=os.path.join(root, "init"), **{"optim.grad_accum": 2})
  c.stage2 = stage("stage2", root, init=os.path.join(run, "stage1"))   # stage 1's output
  results = train_main.run(c, run)
  assert [r["step"] for r in results] == [8, 8] and not any(r["preempted"] for r in results)

  for name in c.chain:
    w = os.path.join(run, name)
    recs = records(w)
    assert [r["step"] for r in recs] == list(range(1, 9))
    losses = [r["loss"] for r in recs]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses   # the loss falls
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time", "flops", "skipped_samples"):
      assert key in recs[-1]
    assert [r["step"] for r in records(w, "eval")] == [4, 8]
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["4", "8"]   # every 4, keep 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(w, "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in ea.Scalars("eval/loss")] == [4, 8]
    # the final output is a checkpoint dir that vlm.from_pretrained reads, tokenizer included
    model, params = vlm.from_pretrained(os.path.join(w, "final"))
    assert os.path.exists(os.path.join(w, "final", "tokenizer", "tokenizer_config.json"))
    ids = np.full((1, 6), 5, np.int32)
    assert np.isfinite(np.asarray(model.apply({"params": params}, ids))).all()

  start, one, two = (params_of(os.path.join(root, "init")), params_of(f"{run}/stage1/final"),
                     params_of(f"{run}/stage2/final"))
  trained1 = lambda k: k[0] == "connector" or k[:2] in (("llm", "embed"), ("llm", "norm"),
                                                       ("llm", "lm_head"))
  for k, v in start.items():   # stage 1: frozen weights bitwise unchanged, the rest moved
    assert np.array_equal(one[k], v) != trained1(k), k
  for k, v in one.items():     # stage 2 starts from stage 1's output; the tower stays frozen
    assert np.array_equal(two[k], v) == (k[0] == "vision"), k
  # stage 2's output renders prompts as its data was rendered (stage 1, `plain`, keeps the model's)
  formats = [checkpoint.load_config(f"{run}/{n}/final") for n in c.chain]
  assert [(f.template, f.image_position) for f in formats] == [("llama3", None), ("llama3", "keep")]
  # a finished stage is skipped when the chain runs again
  assert [r["step"] for r in train_main.run(c, run)] == [None, None]
  # `python -m convert export` takes the final output (S2 towers go out in the LLaVA layout)
  from convert import cli
  cli.main(["export", "--to", "llava", f"{run}/stage2/final", "--out", f"{run}/exported"])
  assert os.path.exists(os.path.join(run, "exported", "config.json"))


DRIVER = r"""
import os, sys, time
from train import main, trainer
call, at, ckdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real = trainer.make_iterator

class Stall:
  '''The real iterator, until the loop asks for its `call`-th batch: the run has then started the
  checkpoint of step `at` (and may have logged steps past it), which we wait for before stalling,
  so the test can SIGKILL this process.'''
  def __init__(self, it):
    self.it, self.n = it, 0
  def __next__(self):
    self.n += 1
    if self.n == call:
      while not os.path.isdir(os.path.join(ckdir, str(at))):
        time.sleep(0.05)
      print("READY", flush=True)
      time.sleep(600)
    return next(self.it)
  def __getattr__(self, name):
    return getattr(self.it, name)

trainer.make_iterator = lambda cfg, **kw: Stall(real(cfg, **kw))
main.entry(["train.main", "--config", sys.argv[4], "--workdir", sys.argv[5]])
"""


def _write_config(c, path):
  """A config file that rebuilds `c` (the command line only takes config files)."""
  with open(path + ".json", "w") as f:
    f.write(c.to_json())
  with open(path, "w") as f:
    f.write("import json, ml_collections\n"
            "def get_config():\n"
            f"  return ml_collections.ConfigDict(json.load(open({path + '.json'!r})))\n")
  return path


def _env(cache):
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PYTHONPATH=ROOT,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _wait_ready(proc, timeout=240):
  t0, lines = time.time(), []
  while time.time() - t0 < timeout:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.strip() == "READY":
      return lines
  proc.kill()
  raise AssertionError("driver never became ready:\n" + "".join(lines[-40:]))


def test_resume_after_sigterm_and_sigkill_is_exact(root, compile_cache, monkeypatch, capsys):
  """SIGTERM while the loop waits for data that does not come, SIGKILL after a step was logged
  past the newest checkpoint: the resumed runs see the straight run's batches, and metrics.jsonl
  and TensorBoard hold each step once."""
  base = os.path.join(root, "resume")
  c = stage("stage2", root, init=os.path.join(root, "init"), **{
      "eval.paths": (), "checkpoint.every": 2, "checkpoint.keep": 10})
  straight = trainer.run(c, os.path.join(base, "straight"))
  assert straight["step"] == 8
  want = {r["step"]: r["loss"] for r in records(os.path.join(base, "straight"))}

  # 1. SIGTERM arrives while the loop waits for the batch of step 3, which never comes (a stuck
  # read): the wait ends, step 2 is saved and the run stops
  w = os.path.join(base, "interrupted")
  real = trainer.make_iterator

  class Term:
    def __init__(self, it):
      self.it, self.n = it, 0

    def __next__(self):
      self.n += 1
      if self.n == 3:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
          time.sleep(0.05)
        raise AssertionError("SIGTERM did not end the wait for data")
      return next(self.it)

    def __getattr__(self, name):
      return getattr(self.it, name)
  monkeypatch.setattr(trainer, "make_iterator", lambda cfg, **kw: Term(real(cfg, **kw)))
  assert trainer.run(c, w) == {"final": None, "step": 2, "preempted": True}
  monkeypatch.undo()
  assert "preempted: checkpoint of step 2 saved" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2"]
  first = records(w)
  assert [r["step"] for r in first] == [1, 2]

  # 2. the command resumes at step 2, checkpoints step 4, logs step 5 and is SIGKILLed while it
  # asks for the batch of step 8 (its 6th)
  every4 = c.copy_and_resolve_references()
  every4.checkpoint.every = 4
  cfg_file = _write_config(every4, os.path.join(base, "config.py"))
  p = subprocess.Popen([sys.executable, "-c", DRIVER, "6", "4", os.path.join(w, "checkpoints"),
                        cfg_file, w], cwd=ROOT, env=_env(compile_cache), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  _wait_ready(p)
  p.send_signal(signal.SIGKILL)
  p.wait(timeout=60)
  assert [r["step"] for r in records(w)] == [1, 2, 3, 4, 5]   # step 5 is past the checkpoint
  # 3. resumed again from step 4, in this process, to the end: step 5 is logged once, anew
  assert trainer.run(c, w)["step"] == 8
  rows = records(w)
  assert [r["step"] for r in rows] == list(range(1, 9))
  for r in rows:   # the straight run's loss at every step
    assert r["loss"] == want[r["step"]], (r["step"], r["loss"], want[r["step"]])
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  ea = EventAccumulator(os.path.join(w, "tensorboard"))
  ea.Reload()
  assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))
  assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([want[i] for i in
                                                                       range(1, 9)])
  a, b = params_of(os.path.join(base, "straight", "final")), params_of(os.path.join(w, "final"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # the completion record counts the whole stage over both resumes, as the straight run's does
  # (the step's own token counts in metrics.jsonl are the reference); only the time differs
  recs = [json.load(open(os.path.join(d, "summary.json"))) for d in (f"{base}/straight", w)]
  rows = records(os.path.join(base, "straight"))
  assert recs[0]["samples"] == 8 * 8 and recs[0]["tokens"] == sum(r["tokens"] for r in rows)
  assert recs[0]["trained_tokens"] == sum(r["trained_tokens"] for r in rows)
  drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "final", "last")}
  assert drop(recs[1]) == drop(recs[0]) and recs[1]["seconds"] > 0
  assert recs[1]["last"]["loss"] == recs[0]["last"]["loss"]


def test_abort_after_m_nonfinite_steps_in_a_row(root, monkeypatch, capsys):
  c = stage("stage2", root, init=os.path.join(root, "init"), **{
      "eval.paths": (), "train.max_nonfinite": 3, "checkpoint.every": 100})

  def poisoned(*args, **kw):   # every step reports non-finite gradients and changes nothing
    def step(st, frozen, batch):
      bad, total = st["nonfinite"] + 1, st["skipped_steps"] + 1
      m = {"loss": np.nan, "grad_norm": np.inf, "tokens": 10, "real_tokens": 10, "finite": False,
           "nonfinite": bad, "skipped_steps": total}
      return (dict(st, step=st["step"] + 1, nonfinite=bad, skipped_steps=total),
              jax.tree_util.tree_map(jax.numpy.asarray, m))
    return step
  monkeypatch.setattr(trainer, "make_train_step", poisoned)
  w = os.path.join(root, "nonfinite")
  with pytest.raises(trainer.NonFiniteError, match=r"3 steps in a row \(up to step 3\) had non-"
                     r"finite loss or gradients.*saved as step 4"):
    trainer.run(c, w)
  out = capsys.readouterr().out
  assert "step 1: non-finite loss or gradients, update skipped (1 in a row, 1 in total)" in out
  assert [r["skipped_steps"] for r in records(w)] == [1, 2, 3]
  assert os.path.isdir(os.path.join(w, "checkpoints", "4"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_of_eight_devices(root, compile_cache):
  c = stage("stage2", root, init=os.path.join(root, "init"), steps=3, **{
      "eval.paths": (), "optim.lr": 1e-4, "data.group_window": 1, "mesh.shape": (2, 2, 2),
      "checkpoint.every": 100})
  one = trainer.run(c, os.path.join(root, "mp_one"))
  assert one["step"] == 3
  cfg_file = _write_config(c, os.path.join(root, "mp_config.py"))
  env = {k: v for k, v in _env(compile_cache).items() if k != "XLA_FLAGS"}
  port, w = _free_port(), os.path.join(root, "mp_two")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "train.main", "--config", cfg_file, "--workdir", w,
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id",
       str(i), "--cpu_devices", "4"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in outs[0]
  a, b = params_of(os.path.join(root, "mp_one", "final")), params_of(os.path.join(w, "final"))
  assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-5
  np.testing.assert_allclose([r["loss"] for r in records(w)],
                             [r["loss"] for r in records(os.path.join(root, "mp_one"))], rtol=1e-5)


@pytest.mark.slow
def test_demo_command_trains_both_stages_from_scratch(tmp_path, compile_cache):
  w = str(tmp_path / "demo")
  out = subprocess.run(
      [sys.executable, "-m", "train.main", "--config", "demo.py", "--workdir", w,
       "--config.stage1.train.epochs=1", "--config.stage2.train.epochs=1"],
      cwd=ROOT, env=_env(compile_cache), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("stage1", "stage2"):
    losses = [r["loss"] for r in records(os.path.join(w, name))]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    assert checkpoint.is_checkpoint(os.path.join(w, name, "final"))
    assert os.listdir(os.path.join(w, name, "tensorboard"))
    assert os.listdir(os.path.join(w, name, "checkpoints"))


def _one_line_error(r) -> str:
  """The command's last stderr line, checked to be its only report: `error: ...`, no traceback."""
  assert "Traceback" not in r.stderr and "Grain has removed" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), r.stderr[-3000:]
  return last


def test_all_bad_data_stops_at_once_in_one_line_and_writes_no_final(root, tmp_path, compile_cache):
  """The demo command with a wrong data.image_root (a directory without the images) and
  train.steps (data repeated without end): the old loop skipped forever and ignored SIGTERM; now
  the skip guard stops it before any weight is read, with the skips per reason, exit status 2 and
  no final/."""
  w, empty = tmp_path / "demo", tmp_path / "empty"
  w.mkdir()
  empty.mkdir()
  os.symlink(os.path.join(root, "data"), w / "data")   # the prepared demo data (prepare is a no-op)
  t = time.time()
  r = subprocess.run(
      [sys.executable, "-m", "train.main", "--config", "demo.py", "--workdir", str(w),
       f"--config.stage1.data.image_root={empty}", "--config.stage1.train.steps=2"],
      cwd=ROOT, env=_env(compile_cache), capture_output=True, text=True, timeout=240)
  took = time.time() - t
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
  last = _one_line_error(r)
  assert last.startswith("error: lenient mode gave up: the first 20 samples were all bad "
                         "(skipped: missing_image 20); first missing_image: [missing_image] "), last
  assert f"{empty}/images/" in last and "stage1_train.json, sample '" in last, last
  assert "demo_stage1: stopped at step 0 of 2; 0 samples used, 20 skipped (missing_image 20)" in (
      r.stdout), r.stdout
  assert not os.path.exists(w / "stage1" / "final") and not os.path.exists(w / "stage2")
  print(f"all-bad run: exit {r.returncode} after {took:.1f} s")


def test_short_run_writes_no_final_unless_allowed(root):
  """train.steps beyond what the data holds (data.num_epochs=1: 6 batches): no final/, a
  non-zero end naming the shortfall; train.allow_incomplete accepts it and says so in the record;
  a rerun skips the stage only for that record's config and data."""
  w = os.path.join(root, "short")
  c = stage("stage2", root, init=os.path.join(root, "init"), **{
      "eval.paths": (), "data.num_epochs": 1, "checkpoint.every": 100})
  with pytest.raises(trainer.IncompleteRun, match=r"the data ran out after 6 of 8 planned steps: "
                     r"no final model written \(the checkpoint of step 6 is in"):
    trainer.run(c, w)
  assert not os.path.exists(os.path.join(w, "final"))
  c.train.allow_incomplete = True   # resumes at step 6, the data ends at once: accepted
  assert trainer.run(c, w)["step"] == 6
  rec = json.load(open(os.path.join(w, "summary.json")))
  assert (rec["complete"], rec["steps_planned"], rec["steps_done"]) == (False, 8, 6)
  assert rec["samples"] == 6 * 8 and rec["data_files"] and len(rec["config_hash"]) == 16
  assert trainer.run(c, w)["step"] is None   # the same config: stage complete, skipped
  c.train.allow_incomplete = False
  with pytest.raises(UserError, match=r"trained 6 of 8 planned steps"):
    trainer.run(c, w)
  c.optim.lr = 1e-3
  with pytest.raises(UserError, match=r"was trained with another config \(optim.lr: 0.003 -> "
                     r"0.001\); use another --workdir, or delete"):
    trainer.run(c, w)
  os.remove(os.path.join(w, "summary.json"))   # e.g. a final/ left by an untrained older run
  with pytest.raises(UserError, match=r"final has no completion record"):
    trainer.run(c, w)


def _bad_inputs(root, tmp):
  """(name, config, expected one-line error) for the bad inputs a user meets first."""
  init = os.path.join(root, "init")
  broken = os.path.join(tmp, "broken.json")
  with open(broken, "w") as f:
    f.write('[{"id": "a", "conversations": []},\n {"id": "b" "conversations": []}]')
  tok = shutil.copytree(os.path.join(root, "data", "tokenizer"), os.path.join(tmp, "tok"))
  with open(os.path.join(tok, "tokenizer_config.json"), "a") as f:
    f.write("}")
  bad_init = shutil.copytree(init, os.path.join(tmp, "bad_init"))
  with open(os.path.join(bad_init, "config.json"), "w") as f:
    f.write('{"llm": ')
  unfinished = os.path.join(tmp, "stage1_run")
  os.makedirs(os.path.join(unfinished, "checkpoints"))
  data = os.path.join(root, "data", "stage1_train.json")
  return [
      ("strict", stage("stage1", root, init=init, **{"data.strict": True,
                                                     "data.image_root": tmp}),
       rf"error: \[missing_image\] cannot read image: FileNotFoundError; image {tmp}/images/"
       rf"\S+ \({data}, sample '[a-z]+-\d+-cap'\)"),
      ("no_init", stage("stage2", root, init=os.path.join(tmp, "runs", "stage1")),
       rf"error: model.init: directory not found \({tmp}/runs/stage1\); train the stage it starts"),
      ("unfinished_init", stage("stage2", root, init=unfinished),
       rf"error: training workdir {unfinished}: the run has not finished \(no {unfinished}/final; "
       r"no checkpoint yet\); rerun the same train.main command"),
      ("data_json", stage("stage1", root, init=init, **{"data.paths": (broken,)}),
       r"error: \[malformed_json\] element 1: Expecting ',' delimiter: line 2 column 13 "
       rf"\(char 47\) \({broken}\)"),
      ("tokenizer_json", stage("stage1", root, init="scratch", **{"data.tokenizer_dir": tok}),
       rf"error: \[malformed_json\] Extra data at line \d+ column \d+ "
       rf"\({tok}/tokenizer_config.json\)"),
      ("init_json", stage("stage1", root, init=bad_init),
       rf"error: Expecting value in {bad_init}/config.json: line 1 column 9 \(char 8\)"),
  ]


def test_bad_inputs_are_one_line_errors(root, tmp_path, capsys):
  """Strict-mode data errors, a missing or unfinished model.init, malformed JSON in a data file,
  a tokenizer or a checkpoint config: `error: <what> (<file>[, sample <id>])` and exit status 2
  from the command line's error path, before any step."""
  import re
  for name, c, want in _bad_inputs(root, str(tmp_path)):
    with pytest.raises(SystemExit) as e:
      with cli_errors(debug=False):
        train_main.run(c, str(tmp_path / name))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and re.fullmatch(want + r".*", err), (name, err)
    assert not os.path.exists(tmp_path / name / "final"), name


@pytest.mark.slow
def test_strict_and_missing_init_through_the_command(root, tmp_path, compile_cache):
  """The same through `python -m train.main`: nothing but the one line on stderr (no Grain
  footnote, no traceback); --debug brings the traceback back."""
  w = tmp_path / "demo"
  w.mkdir()
  os.symlink(os.path.join(root, "data"), w / "data")
  cmd = [sys.executable, "-m", "train.main", "--config", "demo.py", "--workdir", str(w),
         f"--config.stage1.data.image_root={tmp_path}", "--config.stage1.data.strict=True"]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(compile_cache), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and "error: [missing_image]" in _one_line_error(r)
  r = subprocess.run(cmd + ["--debug"], cwd=ROOT, env=_env(compile_cache), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 1 and "Traceback" in r.stderr and "BadSample" in r.stderr
  r = subprocess.run([sys.executable, "-m", "train.main", "--config", "stage2.py", "--workdir",
                      str(tmp_path / "s2")], cwd=str(tmp_path), env=_env(compile_cache),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  _one_line_error(r)   # every missing path of the recipe, one `error:` line each
  lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error: ")]
  assert lines[0].startswith("error: model.init: directory not found (runs/llama3_med_stage1)")
  assert ("error: data.paths = ('data/llava_med/llava_med_instruct_60k_inline_mention.json', "
          "'data/llama3_med/synth_20k.json'): file not found: "
          "data/llava_med/llava_med_instruct_60k_inline_mention.json") in lines, r.stderr
