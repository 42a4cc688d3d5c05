"""Bad-input errors shared by every data path: each names the sample and the file it came from."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Optional

# Their home is the lowest layer that raises them: vlm reads files a user names too.
from vlm.errors import BadSample, UserError


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
    for line in getattr(found, "lines", None) or [describe(found)]:   # several: one a line
      print(f"error: {line}", file=sys.stderr)
    sys.exit(2)
