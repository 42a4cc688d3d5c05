"""JSON and JSON-lines input files, read so that a malformed one is a BadSample('malformed_json')
naming the file and the line (a bare json.JSONDecodeError names neither the file nor, for JSON
lines, the line of the file). Every command line reads its JSON inputs through here; the training
sources (data/sources.py) index large files lazily and report the same way."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

from data.errors import BadSample


def _text(path) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadSample("malformed_json", f"not UTF-8 text ({e.reason} at byte {e.start})",
                    path=os.fspath(path)) from None


def _where(e: json.JSONDecodeError, line: int = 0) -> str:
  return f"{e.msg} at line {line or e.lineno} column {e.colno}"


def loads(text: str, path, line: int = 0) -> Any:
  """json.loads naming `path` (and `line`, for one line of a JSON-lines file) on failure."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise BadSample("malformed_json", _where(e, line), path=os.fspath(path)) from None


def load_json(path) -> Any:
  """The JSON document in `path`."""
  return loads(_text(path), path)


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
