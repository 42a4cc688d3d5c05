"""TFDS builders (data/tfds_builders): each builds, without TensorFlow, into array_record from a
tiny copy of its real source layout written here, and reads back through tfds.data_source."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data import tfds_builders as builders
from data.errors import BadSample
from data.tfds_builders.__main__ import main as tfds_main


def png(colour, mode="RGB", size=(7, 5)) -> bytes:
  b = io.BytesIO()
  Image.new(mode, size, colour).save(b, format="PNG")
  return b.getvalue()


def write_parquet(path, rows):
  """rows: [(image bytes, question, answer)] in the HF image-VQA export schema."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table({
      "image": [{"bytes": b, "path": f"{i}.png"} for i, (b, _, _) in enumerate(rows)],
      "question": [q for _, q, _ in rows], "answer": [a for _, _, a in rows]}), path)


def read_back(name, out):
  """{split: [records]} through tfds.data_source (array_record, no TensorFlow)."""
  builder = tfds.builder_from_directory(os.path.join(out, name, "1.0.0"))
  assert builder.info.file_format.value == "array_record"
  res = {}
  for split in builder.info.splits:
    src = tfds.data_source(name, split=split, data_dir=out, download=False)
    res[split] = [src[i] for i in range(len(src))]
  return res


def by_id(records):
  return {r["id"].decode(): r for r in records}


def test_vqa_rad_from_hf_parquet(tmp_path):
  src, out = tmp_path / "vqa-rad", str(tmp_path / "out")
  write_parquet(f"{src}/data/train-00000-of-00001-abc.parquet",
                [(png((200, 0, 0)), "Is there a fracture?", "yes"),
                 (png(90, mode="L"), "Where is the lesion?", "left lung"),
                 (png((0, 0, 0, 128), mode="RGBA"), "Is this normal?", "No")])
  write_parquet(f"{src}/data/test-00000-of-00001-abc.parquet",
                [(png((0, 200, 0)), "What modality is this?", "CT")])
  builders.build("vqa_rad", str(src), out)
  got = read_back("vqa_rad", out)
  assert {k: len(v) for k, v in got.items()} == {"train": 3, "test": 1}
  train = by_id(got["train"])
  assert {k: r["answer_type"] for k, r in train.items()} == {
      "train-000000": b"CLOSED", "train-000001": b"OPEN", "train-000002": b"CLOSED"}
  assert train["train-000001"]["question"] == b"Where is the lesion?"
  for r in got["train"] + got["test"]:   # grayscale and RGBA come back as 3-channel uint8
    assert r["image"].shape == (5, 7, 3) and r["image"].dtype == np.uint8
  assert (train["train-000001"]["image"] == 90).all()
  assert tuple(train["train-000000"]["image"][0, 0]) == (200, 0, 0)


def test_vqa_rad_from_original_json(tmp_path):
  src, out = tmp_path / "VQA_RAD", str(tmp_path / "out")
  (src / "VQA_RAD Image Folder").mkdir(parents=True)
  for i in range(2):
    (src / "VQA_RAD Image Folder" / f"synpic{i}.jpg").write_bytes(png((i * 100, 0, 0)))
  recs = [{"qid": 1, "image_name": "synpic0.jpg", "question": "Is the heart enlarged?",
           "answer": "Yes", "answer_type": "CLOSED", "phrase_type": "freeform"},
          {"qid": 2, "image_name": "synpic0.jpg", "question": "How many nodules?", "answer": 2,
           "answer_type": "OPEN ", "phrase_type": "para"},
          {"qid": 3, "image_name": "synpic1.jpg", "question": "Is it normal?", "answer": "no",
           "answer_type": "OPEN", "phrase_type": "test_freeform"}]
  (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
  builders.build("vqa_rad", str(src), out)
  got = read_back("vqa_rad", out)
  assert {k: len(v) for k, v in got.items()} == {"train": 2, "test": 1}
  train, test = by_id(got["train"]), by_id(got["test"])
  assert train["2"]["answer"] == b"2" and train["2"]["answer_type"] == b"OPEN"
  assert train["1"]["answer_type"] == b"CLOSED"
  assert test["3"]["answer_type"] == b"OPEN"   # the source's own type wins over the yes/no rule


def test_slake_english_only(tmp_path):
  src, out = tmp_path / "SLAKE", str(tmp_path / "out")
  for i in range(2):
    (src / "imgs" / f"xmlab{i}").mkdir(parents=True)
    (src / "imgs" / f"xmlab{i}" / "source.jpg").write_bytes(png((0, 0, 50 * i)))
  qid = iter(range(100))

  def rec(img, lang, answer, atype):
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": f"q{lang}?",
            "answer": answer, "q_lang": lang, "answer_type": atype, "qid": next(qid)}

  splits = {"train": [rec(0, "en", "MRI", "OPEN"), rec(0, "zh", "是", "CLOSED"),
                      rec(1, "en", "Yes", "CLOSED")],
            "validation": [rec(1, "en", "Liver", "OPEN"), rec(1, "zh", "肝", "OPEN")],
            "test": [rec(0, "zh", "否", "CLOSED"), rec(0, "en", "No", "CLOSED"),
                     rec(1, "en", "Abdomen", "OPEN")]}
  for split, recs in splits.items():
    (src / f"{split}.json").write_text(json.dumps(recs, ensure_ascii=False))
  builders.build("slake", str(src), out)
  got = read_back("slake", out)
  assert {k: len(v) for k, v in got.items()} == {"train": 2, "validation": 1, "test": 2}
  en = {str(r["qid"]): r for recs in splits.values() for r in recs if r["q_lang"] == "en"}
  for split, recs in got.items():
    for r in recs:
      want = en[r["id"].decode()]
      assert (r["answer"].decode(), r["answer_type"].decode()) == (want["answer"],
                                                                  want["answer_type"])
      assert r["question"] == b"qen?"


def test_path_vqa_cli_sharded_parquet(tmp_path, capsys):
  src, out = tmp_path / "path-vqa", str(tmp_path / "out")
  img = png((10, 20, 30))
  write_parquet(f"{src}/data/train-00000-of-00002-a.parquet",
                [(img, "Is this tumor?", "yes"), (img, "What stain?", "H&E")])
  write_parquet(f"{src}/data/train-00001-of-00002-b.parquet", [(img, "Is it benign?", "no")])
  write_parquet(f"{src}/data/validation-00000-of-00001-c.parquet", [(img, "What organ?", "lung")])
  write_parquet(f"{src}/data/test-00000-of-00001-d.parquet",
                [(img, "Are nuclei visible?", "yes"), (img, "What is shown?", "necrosis")])
  tfds_main(["build", "path_vqa", "--src", str(src), "--out", out])
  assert "path_vqa/train: 3 examples" in capsys.readouterr().out
  got = read_back("path_vqa", out)
  assert {k: len(v) for k, v in got.items()} == {"train": 3, "validation": 1, "test": 2}
  types = {r["answer"].decode(): r["answer_type"].decode() for r in sum(got.values(), [])}
  assert types == {"yes": "CLOSED", "H&E": "OPEN", "no": "CLOSED", "lung": "OPEN",
                   "necrosis": "OPEN"}


@pytest.mark.parametrize("case", ["path_escape", "corrupt_image", "missing_image"])
def test_builder_bad_source_names_the_file(tmp_path, case):
  src = tmp_path / "SLAKE"
  (src / "imgs" / "xmlab0").mkdir(parents=True)
  (tmp_path / "secret.jpg").write_bytes(png(1))
  image = {"path_escape": "../../secret.jpg", "corrupt_image": "xmlab0/source.jpg",
           "missing_image": "xmlab0/gone.jpg"}[case]
  (src / "imgs" / "xmlab0" / "source.jpg").write_bytes(png(1)[:40])   # truncated PNG
  (src / "test.json").write_text(json.dumps([{"img_name": image, "question": "q", "answer": "a",
                                              "q_lang": "en", "answer_type": "OPEN", "qid": 7}]))
  with pytest.raises(BadSample) as e:
    builders.build("slake", str(src), str(tmp_path / "out"))
  assert e.value.reason == case
  assert "sample '7'" in str(e.value) and image.split("/")[-1] in str(e.value)


def test_builder_without_source_files_says_what_is_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="flaviagiammarino/path-vqa"):
    builders.build("path_vqa", str(tmp_path), str(tmp_path / "out"))
