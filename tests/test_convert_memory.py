"""Importing a ~2 GB multi-shard Llama keeps peak RSS under 1.3x the checkpoint size
(bench/convert_memory.py; the measured figure is in docs/benchmarks.md)."""
import os
import sys

import pytest


@pytest.mark.slow
def test_import_peak_rss_under_1_3x_checkpoint():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
  import convert_memory
  out = convert_memory.main(["--gb", "2"])
  assert 1.9 <= out["checkpoint_gb"] <= 2.1
  assert out["peak_over_size"] < 1.3, out
