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


class VqaRad(common.VqaBuilder, tfds.core.GeneratorBasedBuilder):
  """VQA-RAD: 315 radiology images, 2,248 question-answer pairs."""

  HOMEPAGE = "https://osf.io/89kps/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point --src at a copy of flaviagiammarino/vqa-rad (data/{train,test}-*.parquet) or at the "
      f"original release folder holding '{ORIGINAL_JSON}' and '{ORIGINAL_IMAGES}/'.")

  def _sources(self, src):
    """The parquet export's splits, else the original release's: {split: (json path, records)}."""
    parquet = super()._sources(src)
    if parquet:
      return parquet
    by_split: dict = {}
    for path in sorted(glob.glob(os.path.join(src, "**", ORIGINAL_JSON), recursive=True))[:1]:
      for r in load_json(path):
        test = str(r.get("phrase_type", "")).startswith("test")
        by_split.setdefault("test" if test else "train", (path, []))[1].append(r)
    return by_split

  def _generate_examples(self, split, source):
    if not isinstance(source, tuple):
      yield from super()._generate_examples(split, source)
      return
    json_path, records = source
    images = os.path.join(os.path.dirname(json_path), ORIGINAL_IMAGES)
    for r in records:
      yield common.json_example(r, images, "image_name")
