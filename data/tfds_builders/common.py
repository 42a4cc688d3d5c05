"""What the three VQA builders share: features, answer types, image bytes, source readers."""
from __future__ import annotations

import glob
import io
import os
import re
from typing import Iterator, Optional

import tensorflow_datasets as tfds
from PIL import Image

from data.errors import BadSample
from data.image import load_image, resolve_path

# HF parquet shards are named {split}-00000-of-00003[-hash].parquet.
_PARQUET_SPLIT = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)-\d{5}-of-\d{5}")


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3)),
      "question": tfds.features.Text(),
      "answer": tfds.features.Text(),
      "answer_type": tfds.features.Text(),   # OPEN | CLOSED
  })


class VqaBuilder:
  """What the builders share (mixed in before GeneratorBasedBuilder): version 1.0.0, the common
  features, the HOMEPAGE, and splits from `_sources(src)` ({split: source}, an error naming what
  --src should hold when empty) fed to `_generate_examples(split, source)`. The defaults read a
  HF image-VQA parquet export."""
  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = ""

  def _info(self):
    return self.dataset_info_from_configs(features=features(), homepage=self.HOMEPAGE)

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    return {s: self._generate_examples(s, source)
            for s, source in require(self, src, self._sources(src)).items()}

  def _sources(self, src: str) -> dict:
    return parquet_splits(src)

  def _generate_examples(self, split, paths):
    yield from parquet_examples(split, paths)


def answer_type(answer: str, given: Optional[str] = None, key=None) -> str:
  """The source's type when it has one, else CLOSED for yes/no answers and OPEN otherwise."""
  if given is not None and str(given).strip():
    t = str(given).strip().upper()
    if t not in ("OPEN", "CLOSED"):
      raise BadSample("malformed", f"answer_type {given!r} is neither OPEN nor CLOSED",
                      sample_id=key)
    return t
  return "CLOSED" if answer.strip().lower().rstrip(".") in ("yes", "no") else "OPEN"


def image_bytes(raw: bytes, *, where: str, key=None) -> bytes:
  """Keeps a JPEG/PNG as stored when it decodes to RGB or grayscale (tfds makes 3 channels);
  anything else (palette, RGBA, 16-bit, DICOM, other formats) is stored as 8-bit RGB PNG.
  Every image is decoded once here, so a corrupt one fails the build naming its file."""
  try:
    rgb = load_image(raw)
  except BadSample as e:
    raise BadSample(e.reason, e.message, sample_id=key, path=where) from None
  with Image.open(io.BytesIO(raw)) as im:
    if im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L"):
      return raw
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, format="PNG")
  return out.getvalue()


def read_file(path: str, key=None) -> bytes:
  if not os.path.isfile(path):
    raise BadSample("missing_image", "image file not found", sample_id=key, path=path)
  with open(path, "rb") as f:
    return f.read()


def parquet_splits(src: str) -> dict[str, list[str]]:
  """{split: [parquet shard paths]} for a HF parquet export anywhere under `src`."""
  out: dict[str, list[str]] = {}
  for p in sorted(glob.glob(os.path.join(src, "**", "*.parquet"), recursive=True)):
    m = _PARQUET_SPLIT.match(os.path.basename(p))
    if m:
      out.setdefault(m["split"], []).append(p)
  return out


def parquet_examples(split: str, paths: list[str]) -> Iterator[tuple[str, dict]]:
  """HF image-VQA parquet rows (image{bytes,path}, question, answer); ids are split-row."""
  import pyarrow.parquet as pq
  row = 0
  for path in paths:
    for batch in pq.ParquetFile(path).iter_batches(columns=["image", "question", "answer"],
                                                   batch_size=256):
      for rec in batch.to_pylist():
        key = f"{split}-{row:06d}"
        img = rec["image"] or {}
        if not img.get("bytes"):
          raise BadSample("missing_image", "row has no image bytes", sample_id=key, path=path)
        answer = str(rec["answer"]).strip()
        image = image_bytes(img["bytes"], where=f"{path} row {row}", key=key)
        yield key, {"id": key, "image": image,
                    "question": str(rec["question"]).strip(), "answer": answer,
                    "answer_type": answer_type(answer)}
        row += 1


def json_example(r: dict, images: str, image_field: str) -> tuple[str, dict]:
  """(key, example) of a release's JSON QA record (qid, question, answer[, answer_type]) whose
  image `r[image_field]` lies under `images` (and may not leave it)."""
  key = str(r["qid"])
  image = os.fspath(resolve_path(r[image_field], images, key))
  answer = str(r["answer"]).strip()
  return key, {"id": key, "image": image_bytes(read_file(image, key), where=image, key=key),
               "question": str(r["question"]).strip(), "answer": answer,
               "answer_type": answer_type(answer, r.get("answer_type"), key)}


def require(builder, src: str, by_split: dict) -> dict:
  """`by_split` unless it is empty, which gets an error saying what --src should hold."""
  if not by_split:
    raise FileNotFoundError(f"{builder.name}: no source files found under {src}; "
                            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return dict(sorted(by_split.items()))
