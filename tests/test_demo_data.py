"""The demo data set: real bundled images, valid LLaVA-Med JSON, a usable tokenizer."""
import json
import os

import numpy as np
from transformers import AutoTokenizer

from data import demo_data
from data.conversation import encode
from data.image import load_image
from train import demo


def test_demo_data_is_valid_and_trainable(tmp_path):
  paths = demo_data.write(str(tmp_path), train_views=2, test_views=1)
  rows = {k: json.load(open(paths[k])) for k in ("stage1_train", "stage2_train", "stage1_eval",
                                                  "stage2_eval", "vqa_test")}
  assert len(rows["stage1_train"]) == len(rows["stage2_train"]) == 2 * len(demo_data.SOURCES)
  kinds = {r["answer_type"] for r in rows["vqa_test"]}
  assert kinds == {"OPEN", "CLOSED"}
  # Held-out views never appear in training.
  train_imgs = {r["image"] for r in rows["stage2_train"]}
  assert not train_imgs & {r["image"] for r in rows["vqa_test"]}
  # Images are the real sources: CT is grayscale, immunohistochemistry is coloured.
  ct = load_image(rows["stage1_train"][0]["image"], root=str(tmp_path))
  assert ct.dtype == np.uint8 and ct.ndim == 3
  colourful = {r["image"].split("/")[1].split("_")[0]: load_image(r["image"], root=str(tmp_path))
               for r in rows["stage2_train"]}
  spread = lambda im: float(np.abs(im[..., 0].astype(int) - im[..., 2].astype(int)).mean())
  assert spread(colourful["ct"]) < 1 < spread(colourful["histology"])
  tok_dir = demo.tokenizer(str(tmp_path / "tok"), demo_data.corpus(paths) + ["user", "assistant"])
  tok = AutoTokenizer.from_pretrained(tok_dir)
  image_id = tok.convert_tokens_to_ids("<image>")
  for r in rows["stage2_train"]:
    enc = encode(r, tok, "llama3", image_tokens=4, image_token_id=image_id)
    assert (enc["input_ids"] == image_id).sum() == 4 and (enc["labels"] != -100).any()
  assert os.path.exists(paths["ct_dicom"])
