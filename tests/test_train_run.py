"""Whole training runs (train/main.py, train/trainer.py, train/checkpoints.py, train/metrics.py) on
the synthetic demo data with a tiny VLM: both stages chained with checkpoints, metrics.jsonl,
TensorBoard files and loadable final models; exact resume after SIGTERM and SIGKILL; the abort after
M non-finite steps; two CPU processes = one 8-device process (slow); the demo command (slow)."""
import json
import os
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
from train import demo as demo_data
from train import main as train_main
from train import state as state_lib
from train import trainer
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
  cfg = state_lib.source_config(c)
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
at, start, ckdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real = trainer.make_iterator

class Stall:
  '''The real iterator of a run resumed at step `start`, until the loop asks for the batch of step
  at + 3: the loop has then logged step `at` and started its checkpoint, which we wait for before
  stalling, so the test can SIGKILL this process.'''
  def __init__(self, it):
    self.it, self.n = it, 0
  def __next__(self):
    self.n += 1
    if self.n == at - start + 3:
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
  base = os.path.join(root, "resume")
  c = stage("stage2", root, init=os.path.join(root, "init"), **{
      "eval.paths": (), "checkpoint.every": 2, "checkpoint.keep": 10})
  straight = trainer.run(c, os.path.join(base, "straight"))
  assert straight["step"] == 8
  want = {r["step"]: r["loss"] for r in records(os.path.join(base, "straight"))}

  # 1. SIGTERM arrives while the loop takes the batch of step 3: step 2 is saved and the run stops
  w = os.path.join(base, "interrupted")
  real = trainer.make_iterator

  class Term:
    def __init__(self, it):
      self.it, self.n = it, 0

    def __next__(self):
      self.n += 1
      if self.n == 3:
        os.kill(os.getpid(), signal.SIGTERM)
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

  # 2. the command resumes at step 2 and is SIGKILLed once step 4's checkpoint is written
  cfg_file = _write_config(c, os.path.join(base, "config.py"))
  p = subprocess.Popen([sys.executable, "-c", DRIVER, "4", "2", os.path.join(w, "checkpoints"),
                        cfg_file, w], cwd=ROOT, env=_env(compile_cache), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  _wait_ready(p)
  p.send_signal(signal.SIGKILL)
  p.wait(timeout=60)
  second = records(w)[len(first):]
  assert [r["step"] for r in second] == [3, 4]
  # 3. resumed again, in this process, to the end
  assert trainer.run(c, w)["step"] == 8
  third = records(w)[len(first) + len(second):]
  assert [r["step"] for r in third] == [5, 6, 7, 8]
  for r in first + second + third:   # the straight run's loss at every step
    assert r["loss"] == want[r["step"]], (r["step"], r["loss"], want[r["step"]])
  a, b = params_of(os.path.join(base, "straight", "final")), params_of(os.path.join(w, "final"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


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
