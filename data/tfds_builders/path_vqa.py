"""PathVQA (pathology VQA) from the HF parquet export flaviagiammarino/path-vqa
(train/validation/test). The original release keeps its QA pairs in pickles, which we never load."""
from __future__ import annotations

import tensorflow_datasets as tfds

from data.tfds_builders import common


class PathVqa(common.VqaBuilder, tfds.core.GeneratorBasedBuilder):
  """PathVQA: 4,998 pathology images, 32,799 question-answer pairs."""

  HOMEPAGE = "https://github.com/UCSD-AI4H/PathVQA"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point --src at a copy of flaviagiammarino/path-vqa "
      "(data/{train,validation,test}-*.parquet).")
