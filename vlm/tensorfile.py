"""Weight files (safetensors, torch pickles) read one tensor at a time: what vlm.from_pretrained
reads a HF dir with, and what convert/ reads every other format with.

safetensors are read by parsing the header and reading each tensor's bytes with np.fromfile: the
safetensors library's numpy reader has no bfloat16, and a memory map keeps every page read
resident (counted in RSS) while the file stays open, so a whole checkpoint would be held twice.
`.bin` pickles go through torch.load(weights_only=True, mmap=True), torch imported only when one
is met; the map is dropped after each read for the same reason. Writing: convert/tensors.py.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np

from vlm.errors import ConversionError
from vlm.jsonfile import load_json

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
# Buffers older writers saved beside the weights; transformers ignores them on load too.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


class Lazy:
  """A tensor not read yet: call it for the numpy array. Knows its file, key, shape and dtype so
  errors can name them without reading."""
  __slots__ = ("file", "key", "shape", "dtype", "_read")

  def __init__(self, file, key, shape, dtype, read: Callable):
    self.file, self.key, self.shape, self.dtype, self._read = file, key, tuple(shape), dtype, read

  def __call__(self) -> np.ndarray:
    return self._read()


# --- reading -------------------------------------------------------------------------------------

def _safetensors(path) -> dict:
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: truncated safetensors file")
    n = struct.unpack("<Q", head)[0]
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  out = {}
  for key, h in header.items():
    if h["dtype"] not in ST_DTYPES:
      raise ConversionError(f"unsupported dtype {h['dtype']} for {key} in {path}")
    dt = np.dtype(ST_DTYPES[h["dtype"]])
    start, end = h["data_offsets"]
    count = int(np.prod(h["shape"], dtype=np.int64))
    if end - start != count * dt.itemsize:
      raise ConversionError(f"{key} in {path}: {end - start} bytes for shape {h['shape']} {dt}")

    def read(start=8 + n + start, count=count, dt=dt, shape=tuple(h["shape"]), key=key):
      x = np.fromfile(path, dtype=dt, count=count, offset=start)
      if x.size != count:
        raise ConversionError(f"{key} in {path}: file truncated")
      return x.reshape(shape)
    out[key] = Lazy(path, key, h["shape"], dt, read)
  return out


def _torch():
  try:
    import torch
  except ImportError:
    raise ConversionError("reading a pickled .bin checkpoint needs torch (pip install torch), "
                          "or convert it to safetensors first") from None
  return torch


def _torch_load(path, mmap=True):
  torch = _torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except RuntimeError as e:
    if mmap and "mmap" in str(e):  # pre-zipfile pickles cannot be mapped
      return _torch_load(path, mmap=False)
    raise ConversionError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
  except Exception as e:  # weights_only refuses pickles holding code or arbitrary objects
    raise ConversionError(f"refusing to unpickle {path} (weights_only=True): "
                          f"{str(e).splitlines()[0]}") from None


def to_numpy(t) -> np.ndarray:
  """A torch tensor as a numpy array it does not share memory with (bfloat16 via ml_dtypes)."""
  torch = _torch()
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def _bin(path) -> dict:
  sd = _torch_load(path)
  if not isinstance(sd, dict):
    raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
  if "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  out = {}
  for key, t in sd.items():
    if not hasattr(t, "shape"):
      raise ConversionError(f"{path}: entry {key} is a {type(t).__name__}, not a tensor")
    out[key] = Lazy(path, key, t.shape, str(t.dtype).replace("torch.", ""),
                    lambda key=key: to_numpy(_torch_load(path)[key]))
  return out


def read_file(path) -> dict:
  """{key: Lazy} for one .safetensors or .bin file."""
  if not os.path.exists(path):
    raise ConversionError(f"no such weight file: {path}")
  if path.endswith(".safetensors"):
    return _safetensors(path)
  if path.endswith((".bin", ".pt", ".pth")):
    return _bin(path)
  raise ConversionError(f"{path}: unknown weight format (.safetensors | .bin)")


def find_weights(path, stems: Iterable[str] = ("model", "pytorch_model")) -> list:
  """Weight files of a dir for the given stems: `{stem}.safetensors.index.json` shards,
  `{stem}.safetensors`, `{stem}.bin.index.json` shards, `{stem}.bin` (first hit wins)."""
  for stem in stems:
    for ext in (".safetensors", ".bin"):
      idx = os.path.join(path, f"{stem}{ext}.index.json")
      if os.path.exists(idx):
        return [os.path.join(path, x)
                for x in sorted(set(load_json(idx)["weight_map"].values()))]
      single = os.path.join(path, stem + ext)
      if os.path.exists(single):
        return [single]
  return []


def read_files(files: list) -> dict:
  """{key: Lazy} over several files; a key in two files is an error; ignorable buffers dropped."""
  out = {}
  for fname in files:
    for key, t in read_file(fname).items():
      if IGNORED.search(key):
        continue
      if key in out:
        raise ConversionError(f"key {key} in both {out[key].file} and {fname}")
      out[key] = t
  return out


def canonicalize(tensors: dict, name_fn: Callable, *, source: str) -> dict:
  """{key: Lazy} -> {(component, canonical name): Lazy}; a key name_fn cannot place is an error."""
  out = {}
  for key, t in tensors.items():
    canon = name_fn(key)
    if canon is None:
      raise ConversionError(f"unexpected key {key} in {getattr(t, 'file', source)}")
    if canon in out:
      raise ConversionError(f"{key} and {out[canon].key} in {source} are the same weight")
    out[canon] = t
  return out


# --- casting -------------------------------------------------------------------------------------

def cast(x: np.ndarray, dtype, what: str) -> np.ndarray:
  """x.astype(dtype), refusing finite values that become inf (float32 beyond bf16/fp16 range)."""
  dtype = np.dtype(dtype)
  if x.dtype == dtype:
    return x
  with np.errstate(over="ignore"):  # reported below, with the key
    y = x.astype(dtype)
  floating = np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16
  if floating and not np.isfinite(y).all():
    bad = ~np.isfinite(y) & np.isfinite(x)
    if bad.any():
      m = float(np.abs(x[bad].astype(np.float32)).max())
      raise ConversionError(f"dtype overflow casting {what} {tuple(x.shape)} from {x.dtype} to "
                            f"{dtype}: |value| {m:.4g} > {float(ml_dtypes.finfo(dtype).max):.4g}")
  return y


def dtype_of(name: Optional[str]):
  if name is None:
    return None
  try:
    return DTYPES[name]
  except KeyError:
    raise ConversionError(f"unknown dtype {name!r} ({' | '.join(DTYPES)})") from None
