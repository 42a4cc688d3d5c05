"""Bad-input errors shared by every data path: each names the sample and the file it came from."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Optional


class BadSample(ValueError):
  """A sample that cannot be used. `reason` is a short stable key used for skip counters
  (e.g. 'missing_image', 'corrupt_image', 'template_mismatch', 'too_long', 'path_escape')."""

  def __init__(self, reason: str, message: str, *, sample_id=None, path: Optional[str] = None):
    self.reason, self.sample_id, self.path, self.detail = reason, sample_id, path, message
    where = ", ".join(x for x in (path or "", f"sample {sample_id!r}" if sample_id is not None
                                  else "") if x)
    super().__init__(f"[{reason}] {message}" + (f" ({where})" if where else ""))


class UserError(ValueError):
  """A mistake in the user's input, files or command line (not a bug): reported as one line."""


def load_json(path: str):
  """json.load of a user's file; malformed JSON is a UserError naming the file and position
  (json's own error names neither the file nor, through Grain or transformers, the caller)."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"malformed JSON: {e} ({path})") from e
    except UnicodeDecodeError as e:
      raise UserError(f"malformed JSON: not UTF-8 ({path})") from e


def malformed_json_in(directory: str) -> Optional[UserError]:
  """The first *.json file of `directory` that does not parse, as a UserError (None when all do):
  what a loader like transformers' AutoTokenizer failed on, named."""
  try:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
  except OSError:
    return None
  for name in names:
    try:
      load_json(os.path.join(directory, name))
    except UserError as e:
      return e
    except OSError:
      continue
  return None


# What a command line reports as `error: ...` instead of a traceback. ConfigDict's override and
# key errors are AttributeError/KeyError subclasses we cannot tell from bugs, so config code
# re-raises them as UserError itself.
USER_ERRORS = (UserError, BadSample, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, json.JSONDecodeError)


def find_user_error(exc: BaseException) -> Optional[BaseException]:
  """The first user error in `exc`'s cause/context chain: Grain and orbax wrap the real one."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, USER_ERRORS):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def describe(exc: BaseException) -> str:
  """One line: OSErrors name their file, JSON errors the position."""
  if isinstance(exc, OSError) and exc.filename is not None and not isinstance(exc, BadSample):
    return f"{exc.strerror or type(exc).__name__} ({exc.filename})"
  return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def cli_errors(debug: Optional[bool] = None):
  """Around a command's main: user errors become `error: <what>` on stderr and exit status 2.
  Anything else (a bug) keeps its traceback, and so does everything with MEDVLM_DEBUG=1."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - filtered below
    if debug is None:
      debug = os.environ.get("MEDVLM_DEBUG", "") not in ("", "0")
    found = find_user_error(e)
    if found is None or debug:
      raise
    print(f"error: {describe(found)}", file=sys.stderr)
    sys.exit(2)
