"""Every `python -m ...` command in README.md exists, and every flag it uses is one its --help lists.

Commands that need real weights cannot run here; the demo (`make demo`) and the other tests run the
ones that can. All --help calls share one process (runpy) to keep the suite fast."""
import contextlib
import io
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = {"convert": 1, "evaluation.vqa": 1, "data.tfds_builders": 1}


def readme_commands():
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```\n(.*?)```", text, re.S)
  cmds = []
  for block in blocks:
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split("#")[0].strip()
      if line.startswith("python -m "):
        cmds.append(line)
  return cmds


def _help(argv):
  if argv[0] == "train.main":  # absl flags are process-global: ask a fresh process
    import subprocess
    r = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True)
    return r.stdout + r.stderr
  out = io.StringIO()
  old = sys.argv
  sys.argv = argv
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      with pytest.raises(SystemExit) as e:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=False)
  finally:
    sys.argv = old
  assert e.value.code in (0, None), (argv, out.getvalue()[-2000:])
  return out.getvalue()


def test_readme_commands_and_flags_exist():
  cmds = readme_commands()
  assert len(cmds) >= 15
  seen = {}
  for cmd in cmds:
    words = shlex.split(cmd.replace("...", ""))
    module = words[2]
    sub = words[3:3 + SUBCOMMANDS.get(module, 0)]
    key = (module, *sub)
    if key not in seen:
      seen[key] = _help([module, *sub, "--helpfull" if module == "train.main" else "--help"])
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    for flag in flags:
      if flag.startswith("--config."):
        continue  # ml_collections overrides: checked by the config tests
      assert re.search(re.escape(flag) + r"\b", seen[key]), f"{flag} not in `{' '.join(key)} --help`"
