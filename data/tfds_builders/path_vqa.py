"""PathVQA (pathology VQA) from the HF parquet export flaviagiammarino/path-vqa
(train/validation/test). The original release keeps its QA pairs in pickles, which we never load."""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data.tfds_builders import common


class PathVqa(common.VqaInfo, tfds.core.GeneratorBasedBuilder):
  """PathVQA: 4,998 pathology images, 32,799 question-answer pairs."""

  HOMEPAGE = "https://github.com/UCSD-AI4H/PathVQA"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point --src at a copy of flaviagiammarino/path-vqa "
      "(data/{train,validation,test}-*.parquet).")

  def _split_generators(self, dl_manager):
    src = os.fspath(dl_manager.manual_dir)
    return {s: self._generate_examples(s, paths)
            for s, paths in common.require(self, src, common.parquet_splits(src)).items()}

  def _generate_examples(self, split, paths):
    yield from common.parquet_examples(split, paths)
