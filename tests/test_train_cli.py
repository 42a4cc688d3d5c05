"""train.main's command line before any training: --help lists the config's fields and exits 0,
a mistyped --config.FIELD is one `error:` line with the nearest fields, a bad value too, fields
whose default is None can be set, and every train.main override in the docs names a real field of
its config (the first check no subprocess needs; the others parse in a fresh process, as absl's
flags are process-global)."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from data.errors import UserError
from train.main import check_overrides, config_spec, load_config, resolve_config_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_help_lists_the_config_fields_and_exits_0():
  r = cli("--help")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--workdir" in r.stdout and "  optim.lr = 0.001  (> 0)\n" in r.stdout   # and its range
  assert "  data.global_batch = 128  (an integer >= 1; divisible by optim.grad_accum; " in r.stdout
  assert "  data.max_skipped_fraction = 0.01" in r.stdout
  assert "  train.allow_incomplete = False" in r.stdout
  r = cli("--config", "demo.py", "--help")
  assert r.returncode == 0 and "  stage2.optim.lr = 0.003" in r.stdout, r.stderr[-2000:]


def test_override_mistakes_are_one_line():
  r = cli("--config", "demo.py", "--config.stage2.optim.lrr=1")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: unknown config field --config.stage2.optim.lrr in {ROOT}/configs/demo.py (did you "
      "mean --config.stage2.optim.lr?)"], r.stderr[-3000:]
  r = cli("--config", "demo.py", "--config.stage1.optim.lr=abc")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: flag --config.stage1.optim.lr=abc: could not convert string to float: 'abc'"]
  # fields that default to None (the pipeline's default) take a value; --only_check_args stops
  # after parsing
  r = cli("--config", "demo.py", "--config.stage1.data.cache_dir=/tmp/x",
          "--config.stage2.data.num_epochs=2", "--only_check_args")
  assert r.returncode == 0, r.stderr[-3000:]


def test_a_field_named_without_its_stage_gets_the_stages_as_hints():
  c = load_config(os.path.join(ROOT, "configs", "demo.py"))
  with pytest.raises(UserError, match=r"--config.optim.lr in demo.py \(did you mean "
                     r"--config.stage1.optim.lr or --config.stage2.optim.lr\?\)"):
    check_overrides(["x", "--config.optim.lr=1e-3"], c, "demo.py")
  check_overrides(["x", "--config.stage1.model.arch.llm.hidden=32", "--noconfig.stage1.data.strict",
                   "--config.stage2.data.paths", "a.json"], c)


def doc_train_commands():
  """Every `python -m train.main ...` line in a code block of the READMEs and docs/."""
  cmds = []
  for path in [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "train", "README.md"),
               *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
    for block in re.findall(r"```\n(.*?)```", open(path).read(), re.S):
      for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("python -m train.main "):
          cmds.append((os.path.relpath(path, ROOT), line))
  return cmds


def test_documented_overrides_name_real_fields():
  cmds = doc_train_commands()
  assert any("configs/demo.py" in c and "--config.stage2." in c for _, c in cmds)
  for where, cmd in cmds:
    argv = resolve_config_arg(shlex.split(cmd.replace("...", ""))[2:])
    spec = config_spec(argv)
    if spec:
      check_overrides(argv, load_config(os.path.join(ROOT, spec)), f"{where}: {cmd}")


def test_a_training_workdir_resolves_to_its_final_model(tmp_path):
  """train.source.resolve_init: what train.main takes as model.init (and serve.chat as --ckpt)."""
  from data.errors import UserError
  from train.source import resolve_init
  for d in ("run/stage1/final/params", "run/stage2/final/params", "busy/checkpoints/5"):
    os.makedirs(tmp_path / d)
  for d in ("run/stage1/final", "run/stage2/final"):
    (tmp_path / d / "config.json").write_text("{}")
  (tmp_path / "run/stage1/train_config.json").write_text('{"model": {"init": "scratch"}}')
  (tmp_path / "run/stage2/train_config.json").write_text(
      '{"model": {"init": "%s"}}' % (tmp_path / "run/stage1"))
  (tmp_path / "busy/train_config.json").write_text("{}")
  assert resolve_init(str(tmp_path / "run" / "stage1")) == str(tmp_path / "run" / "stage1" / "final")
  assert resolve_init(str(tmp_path / "run/stage1/final")) == str(tmp_path / "run/stage1/final")
  assert resolve_init(str(tmp_path / "run")) == str(tmp_path / "run/stage2/final")
  assert resolve_init("scratch") == "scratch"
  assert resolve_init("preset:llama3_med") == "preset:llama3_med"
  with pytest.raises(UserError, match="has not finished .*step 5"):
    resolve_init(str(tmp_path / "busy"))

