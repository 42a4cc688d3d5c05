"""SLAKE (English part: q_lang == "en") from BoKelvin/SLAKE or the original release:
{train,validation,test}.json (img_name, question, answer, answer_type, q_lang, qid) + imgs/."""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data.jsonfile import load_json
from data.tfds_builders import common

SPLITS = ("train", "validation", "validate", "test")


class Slake(common.VqaBuilder, tfds.core.GeneratorBasedBuilder):
  """SLAKE bilingual medical VQA, English questions only."""

  HOMEPAGE = "https://www.med-vqa.com/slake/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point --src at a copy of BoKelvin/SLAKE with imgs.zip extracted: train.json, "
      "validation.json, test.json and imgs/xmlabN/source.jpg.")

  def _sources(self, src):
    # Older copies call the validation split validate.json.
    return {("validation" if s == "validate" else s): os.path.join(src, f"{s}.json")
            for s in SPLITS if os.path.isfile(os.path.join(src, f"{s}.json"))}

  def _generate_examples(self, split, json_path):
    images = os.path.join(os.path.dirname(json_path), "imgs")
    for r in load_json(json_path):
      if r.get("q_lang") != "en":
        continue
      yield common.json_example(r, images, "img_name")
