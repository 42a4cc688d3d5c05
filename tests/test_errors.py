"""The shared one-line error path of every command line."""
import subprocess
import sys

import pytest

from data.errors import BadSample, cli_errors, find_user_error

SCRIPT = """
import json, sys
from data.errors import cli_errors
with cli_errors():
  try:
    json.loads(sys.argv[1])
  except ValueError as e:
    raise RuntimeError("wrapped, as Grain does") from e
"""


def test_wrapped_user_error_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-c", SCRIPT, "{bad"], capture_output=True, text=True)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [r.stderr.strip()]
  assert r.stderr.startswith("error: Expecting property name")


def test_debug_keeps_traceback():
  r = subprocess.run([sys.executable, "-c", SCRIPT, "{bad"], capture_output=True, text=True,
                     env={"MEDVLM_DEBUG": "1", "PATH": ""})
  assert r.returncode == 1 and "Traceback" in r.stderr


def test_bug_keeps_traceback():
  with pytest.raises(ZeroDivisionError):
    with cli_errors():
      1 / 0


def test_find_user_error_walks_the_chain():
  inner = BadSample("missing_image", "no such file", sample_id=3, path="x.json")
  try:
    try:
      raise inner
    except BadSample:
      raise RuntimeError("outer")
  except RuntimeError as e:
    assert find_user_error(e) is inner
  with pytest.raises(SystemExit) as e:
    with cli_errors():
      open("/nonexistent/file.json")
  assert e.value.code == 2
