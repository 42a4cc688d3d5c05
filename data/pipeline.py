"""The training input pipeline on grain: sources -> seeded shuffle -> per-process shard -> decode,
geometry and tokenization (optionally in worker processes) -> bad-sample accounting -> static-shape
batches (length-grouped padding or packing).

Batches are numpy dicts for this process: input_ids, labels (-100 where not trained), positions,
segment_ids [B, T] int32; pixel_values uint8 [B, n_img, S, S, 3] (anyres: [B, n_img, tiles, t, t, 3]
plus image_sizes int32 [B, n_img, 4]: height, width and the tile grid chosen here); `skipped`:
{reason: count} so far on this process. Rows hold their images in order, padded with zero images;
the model fills the k-th run of <image> placeholders of a row with the k-th image's features.

Bad input raises BadSample naming the sample and file in strict mode; in lenient mode (the training
default) it is skipped, counted per reason, and the first few of each reason are logged. The skip
guard stops a lenient run whose data is mostly bad (a wrong image root, a broken file) with a
SkipGuardError that sums the skips up per reason: when the first `max_leading_skips` samples are
all bad, when more than `max_skipped_fraction` of the samples read were bad (once
`skip_check_after` were read), and always after a whole epoch of bad samples in a row, so an
iterator over bad data can never spin without end, nor end as if it were empty.
The iterator's state (get_state/set_state) is a JSON-serializable dict that restores exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Optional, Sequence

import grain.python as gp
import numpy as np

from data import packing, sources
from data.conversation import encode
from data.errors import BadSample, UserError
from data.image import ImageGeometry, load_image, model_pixels

log = logging.getLogger(__name__)
SKIP = "_skip"
_LOAD_LOCK = threading.Lock()   # transformers' lazy imports are not thread-safe


@dataclasses.dataclass
class DataConfig:
  """Everything the training iterator needs (one instance per data mix)."""
  paths: Sequence[str] = ()          # .json / .jsonl / .array_record files, or tfds:NAME:SPLIT
  image_root: Optional[str] = None   # image paths are relative to it and may not leave it
  template: str = "llama3"
  tokenizer_dir: str = ""
  max_len: int = 2048
  global_batch: int = 128
  per_process_batch: Optional[int] = None   # default: global_batch // jax.process_count()
  mode: str = "pad"                  # 'pad' (length-grouped buckets) | 'pack'
  pad_buckets: Sequence[int] = ()    # pad mode row lengths; default: quarters of max_len
  group_window: int = 32             # pad mode: batches per length-grouping window
  pack_bins: Optional[int] = None    # pack mode: rows packed at once (default: the batch size)
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = 1      # None: repeat forever (each epoch reshuffled)
  worker_count: int = 0              # grain worker processes (0: decode in this process)
  worker_buffer_size: int = 4        # samples each worker keeps ready
  read_threads: int = 2              # threads per process that decode samples
  read_buffer: int = 8               # samples each of those processes prefetches
  strict: bool = False
  geometry: ImageGeometry = ImageGeometry()   # image sizes and placeholder counts: the model's
  image_token_id: int = -1
  max_images_per_row: Optional[int] = None   # default: pad 1, pack as many as max_len could hold;
                                             # 0: text only (batches carry no pixel_values)
  system: Optional[str] = None       # None: the template's default; "": none
  image_position: Optional[str] = None   # keep | first | first_next; None: the template's
  cache_dir: Optional[str] = None    # where JSON indexes are cached (never next to the data)
  tfds_data_dir: Optional[str] = None
  log_skips: int = 3                 # bad samples logged per reason
  max_skipped_fraction: float = 0.01  # lenient mode: abort past this fraction of bad samples,
  skip_check_after: int = 200        #   checked once this many samples were read,
  max_leading_skips: int = 20        #   or when the first this-many samples are all bad (0: off)

  def batch_size(self) -> int:
    if self.per_process_batch:
      return self.per_process_batch
    import jax
    n = jax.process_count()
    if self.global_batch % n:
      raise ValueError(f"global_batch {self.global_batch} not divisible by {n} processes")
    return self.global_batch // n

  def buckets(self) -> list:
    if self.pad_buckets:
      return sorted(self.pad_buckets)
    return sorted({max(1, self.max_len * k // 4) for k in (1, 2, 3, 4)})

  def images_per_row(self) -> int:
    if self.max_images_per_row is not None:
      return self.max_images_per_row
    if self.mode == "pad" or self.geometry.tiler == "anyres":
      return 1
    return max(1, self.max_len // (self.geometry.image_tokens + 1))

  @classmethod
  def from_model(cls, model_config, **kw) -> "DataConfig":
    """Image geometry (ImageGeometry.of), placeholder counts and prompt format (template, image
    position, system prompt) taken from a vlm.config.VLMConfig; `kw` overrides any of them, an
    ImageGeometry field by its name (data.resize_mode=pad)."""
    derived = dict(template=model_config.template, image_token_id=model_config.image_token_id,
                   image_position=model_config.image_position, system=model_config.system)
    if model_config.vision is not None:
      derived["geometry"] = ImageGeometry.of(model_config)
    geometry = {k: kw.pop(k) for k in list(kw) if k in _GEOMETRY}
    out = cls(**{**derived, **kw})
    return dataclasses.replace(out, geometry=dataclasses.replace(out.geometry, **geometry))


_GEOMETRY = {f.name for f in dataclasses.fields(ImageGeometry)}


# --- per-sample processing (runs in grain workers) -----------------------------------------------

def _relocate(e: BadSample, sample_id, data_file: str) -> BadSample:
  """The same error naming the sample and the data file it came from (an image file named by
  the raiser stays in the message)."""
  sid = e.sample_id if e.sample_id is not None else sample_id
  if e.path == data_file and e.sample_id is not None:
    return e
  msg = e.message + (f"; image {e.path}" if e.path and e.path != data_file else "")
  out = BadSample(e.reason, msg, sample_id=sid, path=data_file)
  out.__cause__ = e.__cause__ or e
  return out


class SampleProcessor:
  """Index -> training sample {input_ids, labels, pixel_values[, image_sizes]}, or a skip marker
  {SKIP: reason, "message": ...} in lenient mode. Picklable; the tokenizer loads lazily in each
  process."""

  def __init__(self, cfg: DataConfig, source):
    self.cfg, self.source = cfg, source
    self._tok = None

  def __getstate__(self):
    return {**self.__dict__, "_tok": None}

  @property
  def tokenizer(self):
    with _LOAD_LOCK:
      if self._tok is None:
        from data.tokenizer import load_tokenizer
        self._tok = load_tokenizer(self.cfg.tokenizer_dir)
    return self._tok

  def __call__(self, index: int) -> dict:
    src, j = self.source.locate(int(index))
    sid = f"#{j}"
    try:
      rec = src[j]
      if isinstance(rec, dict) and rec.get("id") is not None:
        sid = rec["id"]
      return self._process(rec, sid, src)
    except BadSample as e:
      e = _relocate(e, sid, src.path)
      if self.cfg.strict:
        raise e
      return {SKIP: e.reason, "message": str(e)}

  def _image_refs(self, rec, sid) -> list:
    """A record's images as a list: paths, encoded bytes, or arrays a source decoded (TFDS)."""
    raw = rec.get("image") if isinstance(rec, dict) else None
    if raw is None or (isinstance(raw, (str, list, tuple)) and not raw):
      return []
    raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if len(raw) > self.cfg.images_per_row():
      raise BadSample("too_many_images", f"{len(raw)} images, at most "
                      f"{self.cfg.images_per_row()} fit a row", sample_id=sid)
    return raw

  def _load(self, ref, sid, src) -> np.ndarray:
    """uint8 [H, W, 3]; paths must stay inside the image root (default: the data file's folder)."""
    if isinstance(ref, np.ndarray):
      return ref if ref.ndim == 3 else np.repeat(ref[..., None], 3, -1)
    if isinstance(ref, (str, bytes)):
      root = self.cfg.image_root or os.path.dirname(src.path)
      return load_image(ref, root=root, sample_id=sid)
    raise BadSample("malformed", f"image must be a path, got {type(ref).__name__}", sample_id=sid)

  def _encode(self, sample, tokens, max_len) -> dict:
    """Template + loss mask (train.validate calls it without the cut to see the full length)."""
    cfg = self.cfg
    return encode(sample, self.tokenizer, cfg.template, image_tokens=tokens,
                  image_token_id=cfg.image_token_id, system=cfg.system,
                  image_position=cfg.image_position, max_len=max_len)

  def _process(self, rec, sid, src) -> dict:
    cfg = self.cfg
    refs = self._image_refs(rec, sid)
    # encode only counts images (arrays from TFDS are not for it to look at)
    sample = {**rec, "image": [f"image{k}" for k in range(len(refs))]} if refs else rec
    images, g = None, cfg.geometry
    if g.tiler == "anyres":   # the placeholder count depends on each image's size
      images = [self._load(r, sid, src) for r in refs]
      tokens = [g.tokens(im.shape[:2]) for im in images]
    else:
      tokens = g.image_tokens
    enc = self._encode(sample, tokens, cfg.max_len)
    out = {"input_ids": enc["input_ids"].astype(np.int32),
           "labels": enc["labels"].astype(np.int32)}
    if cfg.images_per_row() == 0:
      return out
    if images is None:   # decoded only once the text is known to be usable
      images = [self._load(r, sid, src) for r in refs]
    anyres, s = g.tiler == "anyres", g.image_size
    shape = (g.max_tiles, s, s, 3) if anyres else (s, s, 3)
    made = [model_pixels(im, g) for im in images]
    out["pixel_values"] = (np.stack([p for p, _ in made]) if made
                           else np.zeros((0,) + shape, np.uint8))
    if anyres:
      out["image_sizes"] = np.asarray([hw for _, hw in made], np.int32).reshape(len(made), 4)
    return out


# --- bad-sample accounting (main process) --------------------------------------------------------

class SkipGuardError(UserError):
  """Lenient mode skipped too much of the data: not the odd bad sample it is there to tolerate,
  but a wrong data.image_root, a broken file or a template that fits nothing."""


@dataclasses.dataclass(frozen=True)
class SkipGuard:
  """When lenient mode gives up (DataConfig's max_skipped_fraction, skip_check_after,
  max_leading_skips); `epoch`: samples per epoch on this process, the bound on bad samples in a
  row that holds whatever the settings."""
  max_fraction: float = 1.0
  check_after: int = 0
  leading: int = 0
  epoch: int = 0

  @classmethod
  def of(cls, cfg: DataConfig, epoch: int) -> "SkipGuard":
    return cls(cfg.max_skipped_fraction, cfg.skip_check_after, cfg.max_leading_skips, epoch)

  def verdict(self, read: int, bad: int, in_a_row: int) -> Optional[str]:
    """Why to stop after `read` samples of which `bad` were bad (the last `in_a_row` of them in a
    row), or None."""
    if self.leading and read == self.leading and bad == read:
      return f"the first {read} samples were all bad"
    if read >= max(self.check_after, 1) and bad > self.max_fraction * read:
      return (f"{bad} of {read} samples were bad ({bad / read:.1%}, more than "
              f"data.max_skipped_fraction={self.max_fraction:g})")
    if self.epoch and in_a_row >= self.epoch:
      return f"a whole epoch ({in_a_row} samples) in a row was bad"
    return None


def skip_summary(counts: dict) -> str:
  """'missing_image 20, too_long 1': skipped samples per reason, most frequent first."""
  return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class _SkipCountingIterator(gp.DatasetIterator):
  """Drops skip markers, counting them per reason, and applies the skip guard; the counts are
  part of the state."""

  def __init__(self, parent, log_first: int, guard: SkipGuard):
    super().__init__(parent)
    self.counts: dict[str, int] = {}
    self._log_first, self._guard = log_first, guard
    # samples read, bad ones among them, bad ones in a row (measured since the start, or since
    # a restore from a state that predates them)
    self._read = self._bad = self._in_a_row = 0
    self._first: dict[str, str] = {}   # the first message per reason (for the guard's error)

  def _stop(self, why: str):
    first = "; ".join(f"first {k}: {m}" for k, m in self._first.items())
    raise SkipGuardError(f"lenient mode gave up: {why} (skipped: {skip_summary(self.counts)})"
                         + (f"; {first}" if first else "") + ". Fix the data (data.paths, "
                         "data.image_root) or, to accept it, raise data.max_skipped_fraction / "
                         "data.max_leading_skips")

  def __next__(self):
    while True:
      x = next(self._parent)
      self._read += 1
      if SKIP not in x:
        self._in_a_row = 0
      else:
        reason = x[SKIP]
        self._bad, self._in_a_row = self._bad + 1, self._in_a_row + 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._first.setdefault(reason, x["message"])
        if self.counts[reason] <= self._log_first:
          log.warning("skipped sample (%d so far for %s): %s", self.counts[reason], reason,
                      x["message"])
      why = self._guard.verdict(self._read, self._bad, self._in_a_row)
      if why:
        self._stop(why)
      if SKIP not in x:
        return x

  def get_state(self):
    return {"parent": self._parent.get_state(), "skipped": dict(self.counts),
            "guard": [self._read, self._bad, self._in_a_row]}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counts = dict(state["skipped"])
    self._read, self._bad, self._in_a_row = state.get("guard", (0, 0, 0))


class SkipCounting(gp.IterDataset):
  def __init__(self, parent, log_first: int = 3, guard: SkipGuard = SkipGuard()):
    super().__init__(parent)
    self._log_first, self._guard = log_first, guard

  def __iter__(self):
    return _SkipCountingIterator(self._parent.__iter__(), self._log_first, self._guard)


class DataIterator(gp.DatasetIterator):
  """The training iterator: batches with the skip counters attached; grain state (and the orbax
  save/load of grain iterators) passes through."""

  def __init__(self, parent):
    super().__init__(parent)
    todo, self._skips = [parent], None
    while todo and self._skips is None:
      it = todo.pop()
      if isinstance(it, _SkipCountingIterator):
        self._skips = it
      todo.extend(getattr(it, "_parents", ()))

  def __next__(self) -> dict:
    batch = next(self._parent)
    if "skipped" not in batch:  # length-grouped batches carry their window's snapshot
      batch["skipped"] = dict(self._skips.counts) if self._skips else {}
    return batch

  def skip_counts(self) -> dict:
    """The skip counters as they are now (a read-ahead thread may be counting)."""
    for _ in range(10):
      try:
        return dict(self._skips.counts) if self._skips else {}
      except RuntimeError:   # changed size while copied
        continue
    return {}

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    self._parent.close()


# --- assembly ------------------------------------------------------------------------------------

def open_sources(cfg: DataConfig) -> sources.ConcatSource:
  if not cfg.paths:
    raise ValueError("DataConfig.paths is empty")
  paths = [cfg.paths] if isinstance(cfg.paths, str) else cfg.paths
  return sources.ConcatSource([sources.open_source(p, cache_dir=cfg.cache_dir,
                                                   tfds_data_dir=cfg.tfds_data_dir)
                               for p in paths])


def shard_indices(n: int, cfg: DataConfig, shard: Optional[gp.ShardOptions]) -> gp.MapDataset:
  """The indices this process reads, in epoch order: one seeded global permutation (the same on
  every process) cut into disjoint strided shards; each further epoch is reshuffled."""
  shard = shard or gp.ShardByJaxProcess(drop_remainder=True)
  ds = gp.MapDataset.range(n)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  if shard.drop_remainder:
    ds = ds[:n - n % shard.shard_count]
  ds = ds[shard.shard_index::shard.shard_count]
  return ds.repeat(cfg.num_epochs)


def build_dataset(cfg: DataConfig, *, shard: Optional[gp.ShardOptions] = None) -> gp.IterDataset:
  """The grain dataset of batches (see module docstring); `shard` defaults to this JAX process."""
  if cfg.mode not in ("pad", "pack"):
    raise ValueError(f"mode must be 'pad' or 'pack', got {cfg.mode!r}")
  if cfg.geometry.tiler not in ("s2", "single", "anyres"):
    raise ValueError(f"tiler must be s2 | single | anyres, got {cfg.geometry.tiler!r}")
  source = open_sources(cfg)
  epoch = len(shard_indices(len(source), dataclasses.replace(cfg, num_epochs=1), shard))
  ds = shard_indices(len(source), cfg, shard).map(SampleProcessor(cfg, source))
  it = ds.to_iter_dataset(gp.ReadOptions(num_threads=cfg.read_threads,
                                         prefetch_buffer_size=cfg.read_buffer))
  if cfg.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():   # grain's worker start-up reads absl flags
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(gp.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                  per_worker_buffer_size=cfg.worker_buffer_size))
  it = SkipCounting(it, cfg.log_skips, SkipGuard.of(cfg, epoch))
  b = cfg.batch_size()
  if cfg.mode == "pad":
    return packing.LengthGroupedBatch(it, batch_size=b, buckets=cfg.buckets(),
                                      window=cfg.group_window, n_images=cfg.images_per_row(),
                                      seed=cfg.seed)
  return packing.packed_batches(it, batch_size=b, max_len=cfg.max_len,
                                max_images=cfg.images_per_row(), bins=cfg.pack_bins,
                                anyres=cfg.geometry.tiler == "anyres", seed=cfg.seed)


def make_iterator(cfg: DataConfig, *, shard: Optional[gp.ShardOptions] = None) -> DataIterator:
  """The training iterator for this process. Close it (or let it be collected) to stop workers."""
  return DataIterator(iter(build_dataset(cfg, shard=shard)))


def to_global(batch: dict, mesh, sharding=None) -> dict:
  """Per-process numpy batch -> global jax.Arrays on `mesh` (batch axis split over processes).

  `sharding`: a jax Sharding, a PartitionSpec, or a dict of either per key; default: the batch
  axis over the mesh's 'data' and 'fsdp' axes (all axes when it has neither). Non-array entries
  (the skip counters) pass through unchanged."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  if sharding is None:
    axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp")) or tuple(mesh.axis_names)
    sharding = PartitionSpec(axes)

  def place(x, s):
    s = NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s
    return jax.make_array_from_process_local_data(s, x)

  return {k: place(v, sharding[k] if isinstance(sharding, dict) else sharding)
          if isinstance(v, np.ndarray) else v for k, v in batch.items()}
