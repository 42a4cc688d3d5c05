"""bench.profile: kernel time by name and category from a perfetto JSON trace; derived device rows
are not counted twice; a real CPU trace of a jitted function parses."""
import gzip
import json

import pytest

from bench import profile

GPU, HOST = 1, 701
STREAM, OPS_ROW, PY = 13, 2000, 5


def _meta(pid, tid, kind, name):
  e = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
  if tid is not None:
    e["tid"] = tid
  return e


def _x(pid, tid, name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def _synthetic(steps=2):
  """Two steps of a made-up GPU trace: per step a cuBLAS gemm (300 us), cuDNN flash attention
  (200), a loop fusion (60), a transpose (40), an NCCL all-reduce (30) and an unknown kernel (10);
  the 'XLA Ops' row repeats the gemm, the host row has a python event with an hlo_op arg."""
  ev = [_meta(GPU, None, "process_name", "/device:GPU:0"),
        _meta(GPU, STREAM, "thread_name", "Stream #13(Compute)"),
        _meta(GPU, OPS_ROW, "thread_name", "XLA Ops"),
        _meta(HOST, None, "process_name", "/host:CPU"),
        _meta(HOST, PY, "thread_name", "python")]
  kernels = [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 300),
             ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 200),
             ("loop_multiply_fusion_3", 60), ("transpose_fusion_1", 40),
             ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 30), ("mystery_kernel", 10)]
  t = 0.0
  for _ in range(steps):
    for name, dur in kernels:
      ev.append(_x(GPU, STREAM, name, t, dur, correlation_id=1))
      t += dur + 5  # a 5 us launch gap after each kernel
    ev.append(_x(GPU, OPS_ROW, "dot.1", t - 600, 300, hlo_op="dot.1"))
    ev.append(_x(HOST, PY, "ExecuteHelper", t - 600, 600, hlo_op="fusion.9"))
  return ev


def test_categories():
  assert profile.category("gemm_fusion_dot.12") == "matmul/gemm"
  assert profile.category("nvjet_hsh_192x128_64x4_1x2_h_bz_coopA_TNN") == "matmul/gemm"
  assert profile.category("flash_bwd_dkv") == "attention"            # our Pallas kernel
  assert profile.category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
  assert profile.category("MemcpyD2D") == "copy/transpose"
  assert profile.category("input_transpose_fusion") == "copy/transpose"
  assert profile.category("input_reduce_fusion_4") == "fusion/elementwise"
  assert profile.category("all-reduce-start") == "collective"
  assert profile.category("mystery_kernel") == profile.OTHER


def test_synthetic_trace_by_name_and_category(tmp_path):
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": _synthetic(steps=2)}, f)
  events = profile.load(path)
  kern, source = profile.kernel_events(events)
  assert source == "device kernels" and len(kern) == 12   # the XLA Ops row and host left out
  s = profile.summarize(events, steps=2, step_s=1e-3)      # 1 ms wall per step
  assert s["kernel_ms"] == pytest.approx(0.64)             # 300+200+60+40+30+10 us per step
  assert s["busy_ms"] == pytest.approx(0.64)               # no overlap between kernels
  assert s["busy_pct"] == pytest.approx(64.0)
  cats = {c["category"]: c for c in s["categories"]}
  assert cats["matmul/gemm"]["ms"] == pytest.approx(0.3)
  assert cats["matmul/gemm"]["pct_step"] == pytest.approx(30.0)
  assert cats["attention"]["pct_kernel"] == pytest.approx(100 * 200 / 640)
  assert {c: cats[c]["ms"] for c in ("fusion/elementwise", "copy/transpose", "collective",
                                     "other")} == pytest.approx(
      {"fusion/elementwise": 0.06, "copy/transpose": 0.04, "collective": 0.03, "other": 0.01})
  top = s["top"]
  assert [r["ms"] for r in top] == sorted((r["ms"] for r in top), reverse=True)
  assert top[0]["name"].startswith("sm90_xmma_gemm") and top[0]["calls"] == 1.0
  text = profile.format_summary(s, "llm step")
  assert text.startswith("llm step") and "64.0% busy" in text and "[attention]" in text
  assert len(profile.summarize(events, steps=2, top=3)["top"]) == 3


def test_overlapping_streams_count_busy_once():
  ev = [_meta(GPU, None, "process_name", "/device:GPU:0"),
        _meta(GPU, 1, "thread_name", "Stream #1"), _meta(GPU, 2, "thread_name", "Stream #2"),
        _x(GPU, 1, "gemm_a", 0, 100), _x(GPU, 2, "MemcpyH2D", 50, 100)]
  s = profile.summarize(ev, steps=1)
  assert s["kernel_ms"] == pytest.approx(0.2) and s["busy_ms"] == pytest.approx(0.15)


def test_unnamed_streams_fall_back_to_non_derived_rows():
  # No "Stream ..." thread names: every device row counts except the derived ones.
  ev = [_meta(GPU, None, "process_name", "/device:GPU:0"),
        _meta(GPU, OPS_ROW, "thread_name", "XLA Ops"),
        _x(GPU, 7, "gemm_fusion_dot.1", 0, 100), _x(GPU, OPS_ROW, "dot.1", 0, 100),
        _x(HOST, PY, "fusion.2", 0, 50, hlo_op="fusion.2")]
  kern, source = profile.kernel_events(ev)
  assert source == "device kernels" and kern == [("gemm_fusion_dot.1", 0.0, 100.0)]


def test_real_cpu_trace_parses(tmp_path):
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  s = profile.trace_steps(lambda: f(x), 2, tmp_path, title="tiny")
  assert s["trace"].endswith(".json.gz") and s["steps"] == 2 and s["traced_step_ms"] > 0
  assert s["kernels"] >= 2 and s["top"]          # CPU: the host's XLA op events stand in
  assert s["text"].startswith("tiny")
  profile.main([str(tmp_path), "--steps", "2"])  # the CLI finds the same trace
