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

# Their home is the lowest layer that raises them: vlm reads files a user names too.
from vlm.errors import BadSample, UserError


# What a command line reports as `error: ...` instead of a traceback. ConfigDict's override and
# key errors are AttributeError/KeyError subclasses we cannot tell from bugs, so config code
# re-raises them as UserError itself.
USER_ERRORS = (UserError, BadSample, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, json.JSONDecodeError)

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


def _path_in_frames(tb) -> Optional[str]:
  """The innermost file the failing frames held: a file object's name, or a `filename` / `path`
  argument (a write() error, safetensors' I/O error carry no file name)."""
  found = None
  while tb is not None:
    for k, v in tb.tb_frame.f_locals.items():
      if isinstance(v, io.IOBase) and isinstance(getattr(v, "name", None), str):
        found = v.name
      elif k in ("filename", "path") and isinstance(v, (str, os.PathLike)):
        found = os.fspath(v)
    tb = tb.tb_next
  return found


def os_failure(exc: BaseException) -> Optional[str]:
  """One line for a full / read-only / forbidden disk or too many open files anywhere in `exc`'s
  chain, naming the path: OSError (its filename, else the file the failing code held), or an
  error that carries the OS error's code in its text: tensorstore's (orbax writes through it:
  `[os_error_code='28']` and the file) and safetensors' (`(os error 28)`)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code, path = None, None
    if isinstance(exc, OSError) and exc.errno in OS_FAILURES:
      code, path = exc.errno, exc.filename or exc.filename2 or _path_in_frames(exc.__traceback__)
    else:   # tensorstore: [os_error_code='28'] and the file; Rust (safetensors): (os error 28)
      m = re.search(r"os_error_code='(\d+)'|\(os error (\d+)\)", str(exc))
      if m and int(m.group(1) or m.group(2)) in OS_FAILURES:
        code = int(m.group(1) or m.group(2))
        paths = re.findall(r'"(/[^"]+)"', str(exc))
        path = paths[-1] if paths else _path_in_frames(exc.__traceback__)
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
    for text in [line] if line else (getattr(found, "lines", None) or [describe(found)]):
      print(f"error: {text}", file=sys.stderr)   # several: one a line
    sys.exit(2)
  finally:
    logging.getLogger("absl").removeFilter(quiet)
