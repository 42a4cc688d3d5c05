"""Random-access sample sources for grain.

Every source maps an index to a LLaVA-style record `{"id", "image", "conversations", ...}` and is
cheap to pickle, so grain worker processes get their own copy. JSON files are read lazily: an index
of each top-level element's byte span is built once (kept in memory, or in a user-given cache dir,
never next to the data) and records are parsed on access.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import threading
from typing import Any, Optional, Sequence

import numpy as np

from data.errors import BadSample

_INDEX_CACHE: dict[str, np.ndarray] = {}
_OPEN_LOCK = threading.Lock()


def _index_key(path: str) -> str:
  st = os.stat(path)
  return hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def _scan_json_list(raw: bytes, path: str) -> np.ndarray:
  """Byte spans of the elements of a top-level JSON list (each parsed once to find its end)."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadSample("malformed_json", f"not UTF-8: {e}", path=path) from e
  ascii_only = len(text) == len(raw)
  decoder, ws = json.JSONDecoder(), " \t\r\n"
  pos, spans = text.index("[") + 1, []
  byte_pos, char_pos = pos, pos   # kept in step only for non-ASCII files

  def to_bytes(c: int) -> int:
    nonlocal byte_pos, char_pos
    if ascii_only:
      return c
    byte_pos += len(text[char_pos:c].encode("utf-8"))
    char_pos = c
    return byte_pos

  expect_value = True
  while True:
    while pos < len(text) and text[pos] in ws:
      pos += 1
    if pos >= len(text):
      raise BadSample("malformed_json", "unterminated top-level list", path=path)
    if text[pos] == "]" and (not spans or not expect_value):
      break
    if not expect_value:
      if text[pos] != ",":
        raise BadSample("malformed_json", f"expected ',' at char {pos}", path=path)
      pos, expect_value = pos + 1, True
      continue
    try:
      _, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise BadSample("malformed_json", f"element {len(spans)}: {e}", path=path) from e
    spans.append((to_bytes(pos), to_bytes(end)))
    pos, expect_value = end, False
  if text[pos + 1:].strip():
    raise BadSample("malformed_json", "trailing data after the top-level list", path=path)
  return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _scan_jsonl(raw: bytes) -> np.ndarray:
  """Byte spans of the non-blank lines of a JSON-lines file."""
  ends = np.flatnonzero(np.frombuffer(raw, np.uint8) == 10)
  starts = np.concatenate([[0], ends + 1])
  ends = np.concatenate([ends, [len(raw)]])
  keep = [i for i, (a, b) in enumerate(zip(starts, ends)) if raw[a:b].strip()]
  return np.stack([starts[keep], ends[keep]], axis=1).astype(np.int64).reshape(-1, 2)


def json_index(path: str, cache_dir: Optional[str] = None) -> np.ndarray:
  """[N, 2] int64 byte spans of the records of a JSON list or JSON-lines file.

  Cached per process in memory and, when `cache_dir` is given, as a .npy file keyed by the data
  file's path, size and mtime (a changed file gets a fresh index)."""
  path = os.path.abspath(path)
  key = _index_key(path)
  if key in _INDEX_CACHE:
    return _INDEX_CACHE[key]
  cached = os.path.join(cache_dir, f"{os.path.basename(path)}.{key}.idx.npy") if cache_dir else None
  if cached and os.path.exists(cached):
    spans = np.load(cached)
  else:
    with open(path, "rb") as f:
      raw = f.read()
    head = raw.lstrip()[:1]
    spans = _scan_json_list(raw, path) if head == b"[" else _scan_jsonl(raw)
    if cached:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f"{cached}.{os.getpid()}.tmp.npy"
      np.save(tmp, spans)
      os.replace(tmp, cached)
  _INDEX_CACHE[key] = spans
  return spans


class JsonSource:
  """LLaVA / LLaVA-Med JSON list (or JSON lines) file; records parsed on access."""

  def __init__(self, path: str, cache_dir: Optional[str] = None):
    self.path = os.path.abspath(path)
    self._spans = json_index(self.path, cache_dir)
    self._fd = None
    self._pid = None
    self._newlines = None

  def __len__(self) -> int:
    return len(self._spans)

  def _line(self, byte: int) -> int:
    """The file's line (1-based) holding `byte`; the newlines are found on the first bad record."""
    if self._newlines is None:
      with open(self.path, "rb") as f:
        self._newlines = np.flatnonzero(np.frombuffer(f.read(), np.uint8) == 10)
    return int(np.searchsorted(self._newlines, byte)) + 1

  def __getitem__(self, i: int) -> Any:
    if self._pid != os.getpid():   # file descriptors do not survive fork/spawn
      with _OPEN_LOCK:   # grain reads with several threads; pread on one fd is thread-safe
        if self._pid != os.getpid():
          self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    start, end = (int(x) for x in self._spans[i])
    raw = os.pread(self._fd, end - start, start)
    try:
      return json.loads(raw)
    except json.JSONDecodeError as e:
      raise BadSample("malformed", f"record {i} is not valid JSON: {e.msg} at line "
                      f"{self._line(start) + e.lineno - 1} column {e.colno}",
                      sample_id=f"#{i}", path=self.path) from e

  def __getstate__(self):
    return {**self.__dict__, "_fd": None, "_pid": None, "_newlines": None}

  def __repr__(self):
    return f"JsonSource({self.path!r}, n={len(self)})"


class ArrayRecordSource:
  """ArrayRecord file(s) whose records are UTF-8 JSON samples, one sample a record."""

  def __init__(self, paths: str | Sequence[str]):
    import grain.python as gp
    self.paths = [paths] if isinstance(paths, str) else list(paths)
    self.path = ",".join(self.paths)
    self._src = gp.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> Any:
    raw = self._src[i]
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadSample("malformed", f"record {i} is not a JSON sample: {e}",
                      sample_id=f"#{i}", path=self.path) from e

  def __repr__(self):
    return f"ArrayRecordSource({self.path!r}, n={len(self)})"


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TfdsSource:
  """A split of one of our TFDS VQA datasets (data/tfds_builders), read with `tfds.data_source`
  and shaped as a one-turn LLaVA conversation; the image comes decoded (uint8 HxWx3)."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    import data.tfds_builders  # noqa: F401  registers our builders so tfds can find them by name
    import tensorflow_datasets as tfds
    self.name, self.split, self.data_dir = name, split, data_dir
    self.path = f"tfds:{name}:{split}" + (f" in {data_dir}" if data_dir else "")
    self._src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> Any:
    r = self._src[i]
    return {"id": _text(r["id"]), "image": np.asarray(r["image"]),
            "answer_type": _text(r["answer_type"]),
            "conversations": [{"from": "human", "value": "<image>\n" + _text(r["question"])},
                              {"from": "gpt", "value": _text(r["answer"])}]}

  def __repr__(self):
    return f"TfdsSource({self.path!r}, n={len(self)})"


class ConcatSource:
  """Several sources seen as one; `locate(i)` tells which file a record came from."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def locate(self, i: int) -> tuple[Any, int]:
    k = bisect.bisect_right(self._ends, i)
    return self.sources[k], i - (self._ends[k - 1] if k else 0)

  def __getitem__(self, i: int) -> Any:
    src, j = self.locate(i)
    return src[j]


def open_source(spec: str, *, cache_dir: Optional[str] = None,
                tfds_data_dir: Optional[str] = None):
  """`file.json` / `file.jsonl` -> JsonSource; `file.array_record` (comma-separated shards ok) ->
  ArrayRecordSource; `tfds:NAME:SPLIT` -> TfdsSource."""
  if spec.startswith("tfds:"):
    parts = spec.split(":")
    if len(parts) != 3:
      raise ValueError(f"expected tfds:NAME:SPLIT, got {spec!r}")
    return TfdsSource(parts[1], parts[2], tfds_data_dir)
  if ".array_record" in spec:
    return ArrayRecordSource(spec.split(","))
  if not os.path.exists(spec):
    raise FileNotFoundError(f"data file not found: {spec}")
  return JsonSource(spec, cache_dir)
