"""train/preflight.py: a run config checked against configs/common.py's RULES before anything is
read. The table covers every field a config has; the issue's nonsense values (a global batch of
0 that used to wait for data forever, a negative learning rate that trained backwards, negative
steps that wrote final/) end in one `error:` line each and exit status 2 before any file is
written; several breaches are one line each; cross-field and path rules name what they were held
to."""
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common, demo
from data.errors import cli_errors
from train import main as train_main
from train import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["demo", "stage1", "stage2", "stage2_lora", "ldrt_llava15_lora", "ldrt_llava16_lora"]


def leaves(c, prefix=""):
  out = []
  for k in c.keys():
    v = c[k]
    if isinstance(v, ml_collections.ConfigDict) and len(v) and k not in ("arch", "groups"):
      out += leaves(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def stages(name):
  c = train_main.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  return [c[s] for s in c.chain] if c.get("chain") else [c]


def test_the_table_covers_every_field_and_the_code_names():
  names = set(leaves(common.base()))
  assert names == set(common.RULES), (names ^ set(common.RULES))
  for name in CONFIGS:   # no config adds a field the table does not know
    for c in stages(name):
      assert set(leaves(c)) <= set(common.RULES), name
  from train.plan import RNG_WORDS
  from vlm.families.module import REMAT_POLICIES
  assert set(common.RULES["train.prng_impl"].names) == set(RNG_WORDS)
  assert set(common.RULES["model.remat"].names) == set(REMAT_POLICIES)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_shipped_configs_pass(name):
  c = train_main.resolved(train_main.load_config(os.path.join(ROOT, "configs", f"{name}.py")),
                          "/tmp/w")
  preflight.check(c, "/tmp/w", paths=False, devices=8)


def _run_error(c, tmp_path, capsys) -> list:
  with pytest.raises(SystemExit) as e:
    with cli_errors(debug=False):
      train_main.run(c, str(tmp_path / "w"))
  assert e.value.code == 2
  assert not os.path.exists(tmp_path / "w")   # nothing prepared, nothing written
  return capsys.readouterr().err.strip().splitlines()


def test_negative_lr_and_steps_are_one_line_each(tmp_path, capsys):
  c = demo.get_config()
  c.stage2.optim.lr = -1e-3
  assert _run_error(c, tmp_path, capsys) == ["error: stage2.optim.lr = -0.001: must be > 0"]
  c = demo.get_config()
  c.stage1.train.steps = -5
  assert _run_error(c, tmp_path, capsys) == [
      "error: stage1.train.steps = -5: must be an integer >= 0 (0: as many as train.epochs take)"]


def test_several_breaches_cross_field_and_path_rules(tmp_path, capsys):
  c = demo.stage("stage2")
  c.model.init, c.model.arch = "scratch", demo.ARCH
  c.data.update(global_batch=12, max_len=4, pad_buckets=(4, 8), template="llama4")
  c.optim.update(grad_accum=8, warmup_ratio=1.5, groups={"c": dict(pattern="(", lr=1e-3)})
  c.mesh.shape = (3, -1, 1)
  c.data.update(paths=(str(tmp_path / "nope.json"),), image_root=str(tmp_path),
                tokenizer_dir=str(tmp_path))
  c.eval.paths = ()
  ro = tmp_path / "a_file"   # (a read-only dir would not do: the tests may run as root)
  ro.write_text("")
  c.data.cache_dir = str(ro / "cache")
  c.checkpoint.every = 0
  lines = _run_error(c, tmp_path, capsys)
  # demo.ARCH: S2 over 28 and 56 pixels, 14-pixel patches -> 2 x 2 = 4 image tokens
  assert lines == [
      "error: data.paths = ('{}',): file not found: {}".format(*[str(tmp_path / "nope.json")] * 2),
      "error: data.template = 'llama4': must be one of llama3 | vicuna_v1 | mistral_instruct | "
      "llava_mistral | plain",
      "error: data.max_len = 4: must be more than the tokens of one image (the model's: 4)",
      "error: data.global_batch = 12: must be divisible by optim.grad_accum",
      "error: data.pad_buckets = (4, 8): must be row lengths in [1, data.max_len] (empty: "
      "quarters of max_len)",
      f"error: data.cache_dir = '{ro}/cache': not writable ({ro})",
      "error: optim.groups = {'c': {'lr': 0.001, 'pattern': '('}}: must be {name: {pattern: a "
      "regular expression, lr: > 0}}",
      "error: optim.warmup_ratio = 1.5: must be in [0, 1]",
      "error: mesh.shape = (3, -1, 1): must be (data, fsdp, tensor) sizes >= 1, one of them may "
      "be -1 (the rest), multiplying to the devices used (8 devices)",
      "error: checkpoint.every = 0: must be an integer >= 1"]
  c.mesh.shape, c.optim.grad_accum, c.data.global_batch = (1, -1, 1), 1, 12
  with pytest.raises(preflight.ConfigError) as e:
    preflight.check(c, paths=False)
  assert "data.global_batch = 12: must be divisible by the mesh's data x fsdp devices (8)" in (
      e.value.lines)
  with pytest.raises(preflight.ConfigError) as e:   # a workdir this run cannot write
    preflight.check(c, str(ro / "w"), paths=False)
  assert e.value.lines[0] == f"--workdir {ro}/w: not writable ({ro})"
  chain = demo.get_config()
  chain.chain = ("stage1", "stage3")
  with pytest.raises(preflight.ConfigError) as e:
    preflight.check(chain, paths=False)
  assert e.value.lines == ["chain = ('stage1', 'stage3'): no config for the stage 'stage3'"]


def test_zero_global_batch_is_refused_at_once_by_the_command(tmp_path):
  """It used to train stage 1 and then wait for stage 2's data without end."""
  r = subprocess.run([sys.executable, "-m", "train.main", "--config", "demo.py", "--workdir",
                      str(tmp_path / "w"), "--config.stage2.data.global_batch=0"], cwd=ROOT,
                     capture_output=True, text=True, timeout=150)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: stage2.data.global_batch = 0: must be an integer >= 1"], r.stderr[-3000:]
  assert not os.path.exists(tmp_path / "w")
