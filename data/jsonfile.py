"""JSON and JSON-lines files. Inputs are read so that a malformed one is a
BadSample('malformed_json') naming the file and the line (a bare json.JSONDecodeError names neither
the file nor, for JSON lines, the line of the file). Every command line reads its JSON inputs
through here; the training sources (data/sources.py) index large files lazily and report the same
way. Outputs are written whole through a temporary file (`write_json`, `write_jsonl`), or row by
row to a resumable `JsonlStore`."""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from data.errors import BadSample
# One JSON document read with its one-line error: the model package reads config.json with it too.
from vlm.jsonfile import load_json, loads, position as _where, read_text as _text  # noqa: F401

log = logging.getLogger(__name__)


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line of a JSON-lines file (lines end at "\\n"
  only: str.splitlines would also break inside strings holding U+2028 and the like)."""
  for n, line in enumerate(_text(path).split("\n"), 1):
    if line.strip():
      yield n, _object(loads(line, path, n), path, f"line {n}")


def read_records(path) -> list:
  """The objects of a JSON list, a JSON-lines file or a file holding one object."""
  text = _text(path)
  head = text.lstrip()[:1]
  if head == "[":
    rows = loads(text, path)
    return [_object(r, path, f"record {n}") for n, r in enumerate(rows, 1)]
  if head == "{":
    try:
      return [_object(json.loads(text), path, "the document")]
    except json.JSONDecodeError as e:
      first = next(ln for ln in text.split("\n") if ln.strip())
      try:
        json.loads(first)   # a first line that parses alone: JSON lines, read below
      except json.JSONDecodeError:
        raise BadSample("malformed_json", _where(e), path=os.fspath(path)) from None
  return [row for _, row in iter_jsonl(path)]


def _object(row, path, what: str) -> dict:
  if not isinstance(row, dict):
    raise BadSample("malformed_json", f"{what} is a {type(row).__name__}, not an object",
                    path=os.fspath(path))
  return row


def malformed_json_in(directory) -> Optional[BadSample]:
  """The first *.json file of `directory` that does not parse, as a BadSample (None when all do):
  what a loader like transformers' AutoTokenizer failed on, named."""
  try:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
  except OSError:
    return None
  for name in names:
    try:
      load_json(os.path.join(directory, name))
    except BadSample as e:
      return e
    except OSError:
      continue
  return None


def _write_atomic(path, write) -> None:
  """`write(file)` to a temp file renamed over `path`, so a reader never sees half of it."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    write(f)
  os.replace(tmp, path)


def write_json(path, obj: Any, *, indent: int = 1) -> None:
  """One JSON document, written whole."""
  _write_atomic(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=indent))


def write_jsonl(path, rows: Iterable[dict]) -> None:
  """One JSON object a line, written whole."""
  _write_atomic(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in rows))


class JsonlStore:
  """Append-only JSONL of finished rows keyed by `key`: what a resumed run skips.

  Each append is one `write` of a full line followed by `flush`, so a killed process leaves at most
  one torn last line, which `load` cuts off (that row is simply redone); a last row that is whole
  but lost its newline is kept. Later rows win over earlier ones with the same key (used to redo
  recorded failures on request). Any other bad line is an error naming it: the file is not ours to
  repair.
  """

  def __init__(self, path, key: str = "id"):
    self.path, self.key = Path(path), key
    self._lock = threading.Lock()
    self._f = None

  def load(self) -> dict:
    rows: dict = {}
    if not self.path.exists():
      return rows
    lines = self.path.read_bytes().split(b"\n")  # the last item is what follows the final newline
    keep = 0  # bytes of whole lines so far
    for n, line in enumerate(lines, 1):
      if line.strip():
        try:
          row = json.loads(line)
          rows[row[self.key]] = row
        except (ValueError, KeyError, TypeError) as e:
          if n < len(lines):
            raise BadSample("malformed_json", f"line {n} is not a JSON row with {self.key!r} "
                            f"({e}); fix or delete the file to start over",
                            path=os.fspath(self.path)) from None
          log.warning("%s: dropping a torn last line left by an interrupted run", self.path)
          with open(self.path, "r+b") as f:
            f.truncate(keep)
          break
        if n == len(lines):  # a whole row whose newline was lost
          with open(self.path, "ab") as f:
            f.write(b"\n")
      keep += len(line) + 1
    return rows

  def append(self, row: dict) -> None:
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with self._lock:
      if self._f is None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
      self._f.write(line)
      self._f.flush()

  def close(self) -> None:
    with self._lock:
      if self._f is not None:
        self._f.close()
        self._f = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
