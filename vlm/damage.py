"""What makes a checkpoint dir unreadable, found before (or instead of) a traceback deep in
tensorstore: a data file deleted or cut short (a full disk, a crash, a partial copy), a corrupt
value; and the command that writes the dir again. Light to import."""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

from vlm.errors import UserError


class DamagedCheckpoint(UserError):
  """A checkpoint dir (or a training step) whose files cannot be read: commands report it as one
  line saying what is missing and how to rebuild it."""


def unreadable(path) -> Optional[str]:
  """What makes the orbax dir `path` unreadable (None when nothing does): a missing or malformed
  metadata file, or an OCDBT value whose data file is gone or too short. Reads one byte of every
  value, so a deleted or truncated data file is found without reading the arrays."""
  import tensorstore as ts
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    return f"{path} is missing"
  for name in ("_METADATA", "_CHECKPOINT_METADATA"):
    meta = os.path.join(path, name)
    try:
      with open(meta, encoding="utf-8") as f:
        json.load(f)
    except FileNotFoundError:
      if name == "_METADATA":
        return f"{meta} is missing"
    except ValueError as e:
      return f"{meta} is malformed ({e})"
  if not os.path.exists(os.path.join(path, "manifest.ocdbt")):
    return (f"{path}/manifest.ocdbt is missing"
            if glob.glob(os.path.join(path, "ocdbt.process_*")) else None)
  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()
    keys = kv.list().result()
  except ValueError as e:
    return f"the OCDBT index in {path} cannot be read ({_first_line(e)})"
  reads = [(k, kv.read(k, byte_range=slice(-1, None))) for k in keys]
  for key, r in reads:
    try:
      got = r.result()
    except ValueError as e:
      return f"{_data_file(path, e)} is truncated (array piece {key.decode()} is cut off)"
    if got.state != "value" or len(got.value) != 1:
      return f"{_data_file(path)} is missing (array piece {key.decode()})"
  return None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _data_file(path: str, error: Optional[BaseException] = None) -> str:
  """The data file a tensorstore read error points at (by the size it reports), else where the
  data files are."""
  size = re.search(r"for value of size (\d+)", str(error or ""))
  if size:
    found = [f for f in glob.glob(os.path.join(path, "**", "d", "*"), recursive=True)
             if os.path.getsize(f) == int(size.group(1))]
    if len(found) == 1:
      return found[0]
  return f"a data file under {path}/ocdbt.process_*/d"


def rebuild_hint(path) -> str:
  """The command that writes model dir `path` again: a training run's final/ is rewritten by
  rerunning its train.main command (it resumes from the newest checkpoint); anything else by the
  convert command that made it."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.basename(os.path.abspath(path)) == "final" and any(
      os.path.exists(os.path.join(parent, f)) for f in ("train_config.json", "checkpoints")):
    return (f"delete {path} and rerun the python -m train.main command of {parent}: it resumes "
            "from its newest checkpoint and writes the model again")
  return ("write it again with the command that made it (python -m convert import ... / "
          "python -m convert merge-lora ...)")


def read_error(exc: Optional[BaseException]) -> Optional[str]:
  """The first line of a tensorstore read failure in `exc`'s chain (a corrupt or cut-off value),
  or None."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, ValueError) and "Error reading" in str(exc):
      return _first_line(exc)
    exc = exc.__cause__ or exc.__context__
  return None
