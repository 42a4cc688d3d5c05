"""bench/serve.py's own arithmetic (the workload, the Poisson schedule, the summary figures) and,
slow, one smoke run of the whole benchmark."""
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from bench import serve_load as L


def test_poisson_arrivals_are_a_poisson_process():
  rate, n = 5.0, 20000
  t = L.poisson_arrivals(n, rate, seed=3)
  gaps = np.diff(t)
  assert t[0] == 0 and (gaps > 0).all() and len(t) == n
  # exponential gaps of mean 1/rate (Kolmogorov-Smirnov against scipy's exponential)
  assert stats.kstest(gaps, stats.expon(scale=1 / rate).cdf).pvalue > 0.01
  counts = np.histogram(t, bins=np.arange(0, t[-1], 1.0))[0]   # per-second counts: Poisson
  assert abs(counts.mean() - rate) < 0.2 and abs(counts.var() / counts.mean() - 1) < 0.1
  np.testing.assert_array_equal(t, L.poisson_arrivals(n, rate, seed=3))


def test_workload_mix():
  reqs = L.workload(400, seed=1, image_uris=["a", "b"])
  words = np.array([len(r.question.split()) for r in reqs])
  tokens = np.array([r.max_tokens for r in reqs])
  assert words.min() >= 4 and words.max() <= 161 and np.median(words) < 40 < words.max()
  assert tokens.min() >= 8 and tokens.max() <= 256 and tokens.max() - tokens.min() > 200
  assert sum(r.image is not None for r in reqs) == 200
  assert [r.question for r in L.workload(400, 1, ["x"], images=False)] == [r.question for r in reqs]


def test_summary_figures():
  """Two streams: TTFT = first chunk after sending, ITL = gaps between a stream's chunks."""
  a = L.Timing(sent=0.0, chunks=[0.1, 0.3, 0.6], tokens=3)
  b = L.Timing(sent=1.0, chunks=[0.5, 0.6], tokens=2)
  s = L.summary([a, b], elapsed=2.0)
  assert s["req_s"] == 1.0 and s["tok_s"] == 2.5 and s["requests"] == 2
  ttft, itl = [100.0, 500.0], [200.0, 300.0, 100.0]
  assert s["ttft_p50_ms"] == pytest.approx(300.0) and s["itl_p50_ms"] == pytest.approx(200.0)
  assert s["ttft_p99_ms"] == pytest.approx(100 + 0.99 * 400)   # linear between the two
  assert s["itl_p99_ms"] == pytest.approx(200 + 0.98 * 100)
  assert max(ttft) >= s["ttft_p99_ms"] and max(itl) >= s["itl_p99_ms"]


@pytest.mark.slow  # 1-3 min on 2 cores: the engine server starts (compiles), serves 28 requests
def test_bench_serve_quick_run():
  out = subprocess.run([sys.executable, "-m", "bench.serve", "--quick", "--systems", "engine"],
                       capture_output=True, text=True, check=True).stdout
  rows = [line for line in out.splitlines() if line.startswith("| engine |")]
  assert len(rows) == 4 and "FAILED" not in out, out
