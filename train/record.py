"""The completion record of a stage, WORKDIR/summary.json: written last, after final/, it is what
makes final/ mean "this config trained the planned steps on this data". A rerun skips the stage
only when the record is there, says complete (or the config allows an incomplete run) and matches
the config's hash and the data's fingerprint; final/ without such a record is an error that says
why, never a stage silently taken as done.

The hash leaves out what does not change the trained model (checkpointing, mesh, logging,
held-out evaluation, loader throughput, the skip guard's limits). The data fingerprint is each
data file's size and a hash of its first and last MiB (cheap on multi-GB files, and unmoved by a
copy or `touch`); images are not fingerprinted.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from data.errors import UserError
from data.jsonfile import load_json
from vlm import checkpoint

NAME = "summary.json"
RUNTIME = ("name", "checkpoint", "mesh", "eval", "prepare", "train.log_every", "train.peak_tflops",
           "train.allow_incomplete", "data.worker_count", "data.worker_buffer_size",
           "data.read_threads", "data.read_buffer", "data.cache_dir", "data.log_skips",
           "data.max_skipped_fraction", "data.skip_check_after", "data.max_leading_skips")
_EDGE = 2**20


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def trained_fields(config) -> dict:
  """The config's fields that decide the trained model, flat ('optim.lr': 0.001, ...)."""
  flat = _flat(json.loads(config.to_json_best_effort(sort_keys=True)))
  return {k: v for k, v in flat.items()
          if not any(k == r or k.startswith(r + ".") for r in RUNTIME)}


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_print(path: str) -> str:
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    h.update(f.read(_EDGE))
    if size > 2 * _EDGE:
      f.seek(size - _EDGE)
      h.update(f.read(_EDGE))
    elif size > _EDGE:
      h.update(f.read())
  return f"{size}:{h.hexdigest()[:16]}"


def data_files(config) -> dict:
  """{data path: fingerprint} (tfds specs and array_record shard lists by name)."""
  out = {}
  for spec in config.data.paths:
    paths = spec.split(",") if ".array_record" in spec else [spec]
    for p in paths:
      out[p] = _file_print(p) if os.path.isfile(p) else "not a local file"
  return out


def make(config, *, steps_planned: int, steps_done: int, complete: bool, **extra) -> dict:
  fields, files = trained_fields(config), data_files(config)
  return {"complete": complete, "steps_planned": steps_planned, "steps_done": steps_done,
          "config_hash": _digest(fields), "data_fingerprint": _digest(files),
          "config": fields, "data_files": files, **extra}


def write(workdir: str, rec: dict):
  tmp = os.path.join(workdir, NAME + ".tmp")
  with open(tmp, "w") as f:
    json.dump(rec, f, indent=2, default=float)
  os.replace(tmp, os.path.join(workdir, NAME))


def _changes(old: dict, new: dict, n: int = 4) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:n]]
  return ", ".join(shown) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def finished(config, workdir: str) -> Optional[dict]:
  """The record when WORKDIR/final is a finished run of this config on this data (the stage is
  skipped), None when there is no final model; UserError when there is one this run cannot
  take as its own."""
  final = os.path.join(workdir, "final")
  if not checkpoint.is_checkpoint(final):
    return None
  redo = f"use another --workdir, or delete {workdir} to train the stage again"
  path = os.path.join(workdir, NAME)
  if not os.path.exists(path):
    raise UserError(f"{final} has no completion record ({path}): it was left by a run that did "
                    f"not finish or by an older version; {redo}")
  rec = load_json(path)
  if "config_hash" not in rec:
    raise UserError(f"{final} has no completion record ({path} predates them); {redo}")
  fields, files = trained_fields(config), data_files(config)
  if rec["config_hash"] != _digest(fields):
    raise UserError(f"{final} was trained with another config ({_changes(rec['config'], fields)}); "
                    f"{redo}")
  if rec["data_fingerprint"] != _digest(files):
    raise UserError(f"{final} was trained on other data ({_changes(rec['data_files'], files)}); "
                    f"{redo}")
  if not rec["complete"] and not config.train.get("allow_incomplete", False):
    raise UserError(f"{final} trained {rec['steps_done']} of {rec['steps_planned']} planned steps "
                    f"(written with train.allow_incomplete); set it again to accept that model, "
                    f"or {redo}")
  return rec
