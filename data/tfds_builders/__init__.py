"""TFDS builders for the zero-shot VQA benchmarks, built from local files without TensorFlow into
array_record (`python -m data.tfds_builders build NAME --src DIR --out DIR`). Importing this package
registers vqa_rad, slake and path_vqa with tfds."""
from data.tfds_builders.path_vqa import PathVqa
from data.tfds_builders.slake import Slake
from data.tfds_builders.vqa_rad import VqaRad

BUILDERS = {"vqa_rad": VqaRad, "slake": Slake, "path_vqa": PathVqa}


def build(name: str, src: str, out: str):
  """Builds dataset `name` from the local files in `src` into `out`; returns the builder."""
  import tensorflow_datasets as tfds
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(BUILDERS)}")
  builder = BUILDERS[name](data_dir=out, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=src))
  return builder
