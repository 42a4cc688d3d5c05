"""Weight files written one tensor at a time: at most one shard is buffered, written with
safetensors.numpy.save_file (which does write bfloat16). Reading is vlm/tensorfile.py's.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

import numpy as np

from vlm.errors import ConversionError
from vlm.tensorfile import cast


def parse_size(s) -> int:
  """'2GB' / '500MB' / '100KB' / bytes -> bytes (decimal units, as transformers uses)."""
  if isinstance(s, int):
    return s
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(s), re.I)
  if not m:
    raise ConversionError(f"bad size {s!r} (e.g. 2GB, 500MB, 1000000)")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  return int(float(m.group(1)) * mult[unit])


class ShardWriter:
  """Writes `{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors` + index json once the
  tensors exceed max_shard_bytes. Holds at most one shard in memory."""

  def __init__(self, out_dir, max_shard_bytes: int, stem: str = "model", metadata=None):
    self.dir, self.max, self.stem = out_dir, max_shard_bytes, stem
    self.meta = dict(metadata or {"format": "pt"})
    self.buf, self.size, self.shards, self.total = {}, 0, [], 0
    os.makedirs(out_dir, exist_ok=True)

  def add(self, name: str, x: np.ndarray):
    if name in self.buf or any(name in keys for _, keys in self.shards):
      raise ConversionError(f"{name} written twice")
    if self.buf and self.size + x.nbytes > self.max:
      self._flush()
    self.buf[name] = np.ascontiguousarray(x)
    self.size += x.nbytes
    self.total += x.nbytes

  def _flush(self):
    from safetensors.numpy import save_file
    tmp = os.path.join(self.dir, f"{self.stem}.part{len(self.shards)}.safetensors")
    save_file(self.buf, tmp, metadata=self.meta)
    self.shards.append((tmp, list(self.buf)))
    self.buf, self.size = {}, 0

  def close(self) -> list:
    """Finish; returns the written file names."""
    if self.buf or not self.shards:
      self._flush()
    n = len(self.shards)
    if n == 1:
      final = os.path.join(self.dir, f"{self.stem}.safetensors")
      os.replace(self.shards[0][0], final)
      return [final]
    weight_map, names = {}, []
    for i, (tmp, keys) in enumerate(self.shards):
      name = f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(tmp, os.path.join(self.dir, name))
      weight_map.update({k: name for k in keys})
      names.append(os.path.join(self.dir, name))
    with open(os.path.join(self.dir, f"{self.stem}.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
    return names


def write_weights(pairs: Iterable, out_dir, *, max_shard_bytes: int, dtype=None,
                  stem: str = "model") -> list:
  """Stream (name, array) pairs into safetensors shards, cast to `dtype` on the way."""
  w = ShardWriter(out_dir, max_shard_bytes, stem)
  for name, x in pairs:
    w.add(name, x if dtype is None else cast(x, dtype, name))
  return w.close()
