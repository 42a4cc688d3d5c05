"""One JSON document read with a one-line error (BadSample 'malformed_json') naming the file and
the position: the model package reads config.json and weight indexes with it, data/jsonfile.py
builds JSON lines, records and the writers on it."""
from __future__ import annotations

import json
import os
from typing import Any

from vlm.errors import BadSample


def read_text(path) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadSample("malformed_json", f"not UTF-8 text ({e.reason} at byte {e.start})",
                    path=os.fspath(path)) from None


def position(e: json.JSONDecodeError, line: int = 0) -> str:
  return f"{e.msg} at line {line or e.lineno} column {e.colno}"


def loads(text: str, path, line: int = 0) -> Any:
  """json.loads naming `path` (and `line`, for one line of a JSON-lines file) on failure."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise BadSample("malformed_json", position(e, line), path=os.fspath(path)) from None


def load_json(path) -> Any:
  """The JSON document in `path`."""
  return loads(read_text(path), path)
