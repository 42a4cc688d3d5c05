"""Bad-input errors shared by every data path: each names the sample and the file it came from;
and the one-line end of every command line (cli_errors): user errors, a full / read-only /
forbidden disk or too many open files at any writer, and Ctrl-C."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import sys
from typing import Optional

from vlm.damage import DamagedCheckpoint


class BadSample(ValueError):
  """A sample that cannot be used. `reason` is a short stable key used for skip counters
  (e.g. 'missing_image', 'corrupt_image', 'template_mismatch', 'too_long', 'path_escape')."""

  def __init__(self, reason: str, message: str, *, sample_id=None, path: Optional[str] = None):
    self.reason, self.message, self.sample_id, self.path = reason, message, sample_id, path
    where = ", ".join(x for x in (str(path) if path else "",
                                  f"sample {sample_id!r}" if sample_id is not None else "") if x)
    super().__init__(f"[{reason}] {message}" + (f" ({where})" if where else ""))


class UserError(ValueError):
  """A mistake in the user's input, files or command line (not a bug): reported as one line."""


# What a command line reports as `error: ...` instead of a traceback. ConfigDict's override and
# key errors are AttributeError/KeyError subclasses we cannot tell from bugs, so config code
# re-raises them as UserError itself.
USER_ERRORS = (UserError, BadSample, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, json.JSONDecodeError, DamagedCheckpoint)

# OS errors that say what is wrong with the machine, not with the program: (what, what to do).
_RERUN = "then rerun the command (training resumes from its newest checkpoint)"
OS_FAILURES = {
    errno.ENOSPC: ("no space left on device", f"free space or write to another disk, {_RERUN}"),
    errno.EDQUOT: ("disk quota exceeded", f"free space or write to another disk, {_RERUN}"),
    errno.EROFS: ("read-only file system", "choose an output path on a writable disk"),
    errno.EACCES: ("permission denied", "fix its permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose another path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n 65536) and rerun"),
    errno.ENFILE: ("too many open files on this machine", "close other programs and rerun"),
}


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


def _open_file(tb) -> Optional[str]:
  """The name of the innermost file object the failing frames held (a write() error carries no
  file name)."""
  names = None
  while tb is not None:
    for v in tb.tb_frame.f_locals.values():
      name = getattr(v, "name", None) if isinstance(v, io.IOBase) else None
      if isinstance(name, str):
        names = name
    tb = tb.tb_next
  return names


def os_failure(exc: BaseException) -> Optional[str]:
  """One line for a full / read-only / forbidden disk or too many open files anywhere in `exc`'s
  chain, naming the path: OSError (its filename, else the file the failing code held open) or
  tensorstore's ValueError (orbax writes through it: `[os_error_code='28']` and the file)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code, path = None, None
    if isinstance(exc, OSError) and exc.errno in OS_FAILURES:
      code, path = exc.errno, exc.filename or exc.filename2 or _open_file(exc.__traceback__)
    else:
      m = re.search(r"os_error_code='(\d+)'", str(exc))
      if m and int(m.group(1)) in OS_FAILURES:
        code = int(m.group(1))
        paths = re.findall(r'"(/[^"]+)"', str(exc))
        path = paths[-1] if paths else None
    if code is not None:
      what, todo = OS_FAILURES[code]
      return f"{what} ({path or 'path not reported'}): {todo}"
    exc = exc.__cause__ or exc.__context__
  return None


class _QuietOrbaxThreads(logging.Filter):
  """Orbax logs each failing background save thread with its traceback before the main thread
  raises the same error: the command's one line says it."""

  def filter(self, record):
    return "_SignalingThread.run() raised" not in record.getMessage()


def _debugging(debug: Optional[bool]) -> bool:
  return os.environ.get("MEDVLM_DEBUG", "") not in ("", "0") if debug is None else debug


@contextlib.contextmanager
def cli_errors(debug: Optional[bool] = None):
  """Around a command's main: user errors and machine failures (OS_FAILURES) become
  `error: <what>` on stderr and exit status 2; Ctrl-C ends with one line and status 130.
  Anything else (a bug) keeps its traceback, and so does everything with MEDVLM_DEBUG=1."""
  debug = _debugging(debug)
  quiet = _QuietOrbaxThreads()
  if not debug:
    logging.getLogger("absl").addFilter(quiet)
  try:
    yield
  except KeyboardInterrupt:
    if debug:
      raise
    sys.stdout.flush()
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # noqa: BLE001 - filtered below
    line = os_failure(e)
    found = find_user_error(e) if line is None else None
    if debug or (line is None and found is None):
      raise
    print(f"error: {line or describe(found)}", file=sys.stderr)
    sys.exit(2)
  finally:
    logging.getLogger("absl").removeFilter(quiet)
