"""VQA-RAD (radiology VQA) from the HF parquet export flaviagiammarino/vqa-rad (train/test) or
the original release: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`
(test = phrase_type test_*)."""
from __future__ import annotations

import glob
import os

import tensorflow_datasets as tfds

from data.jsonfile import load_json
from data.tfds_builders import common

ORIGINAL_JSON = "VQA_RAD Dataset Public.json"
ORIGINAL_IMAGES = "VQA_RAD Image Folder"


class VqaRad(common.VqaInfo, tfds.core.GeneratorBasedBuilder):
  """VQA-RAD: 315 radiology images, 2,248 question-answer pairs."""

  HOMEPAGE = "https://osf.io/89kps/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point --src at a copy of flaviagiammarino/vqa-rad (data/{train,test}-*.parquet) or at the "
      f"original release folder holding '{ORIGINAL_JSON}' and '{ORIGINAL_IMAGES}/'.")

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    parquet = common.parquet_splits(src)
    if parquet:
      return {s: self._generate_examples(s, parquet=paths)
              for s, paths in common.require(self, src, parquet).items()}
    found = sorted(glob.glob(os.path.join(src, "**", ORIGINAL_JSON), recursive=True))
    by_split: dict = {}
    if found:
      for r in load_json(found[0]):
        test = str(r.get("phrase_type", "")).startswith("test")
        by_split.setdefault("test" if test else "train", []).append(r)
    return {s: self._generate_examples(s, records=recs, json_path=found[0])
            for s, recs in common.require(self, src, by_split).items()}

  def _generate_examples(self, split, parquet=None, records=(), json_path=None):
    if parquet:
      yield from common.parquet_examples(split, parquet)
      return
    images = os.path.join(os.path.dirname(json_path), ORIGINAL_IMAGES)
    for r in records:
      yield common.json_example(r, images, "image_name")
