"""train.aot: compiling a recipe for a GPU / TPU target on this CPU host.

The compiles run `python -m train.aot` in a subprocess (its own JAX, with the compile-only
backends of .aot/site; this process keeps its 8 CPU devices and never sees them). They need
`make aot-deps`: without it they skip, except in CI, where they must run. The in-process tests
check that `auto` attention follows the target and that plain processes never load the backends.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import aot_report
from vlm import attention
from vlm.sharding import activation_sharding, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, ".aot", "site")
TINY = os.path.join(ROOT, "tests", "aot_config.py")
needs_backends = pytest.mark.skipif(
    not os.path.isdir(os.path.join(SITE, "jax_plugins")) and not os.environ.get("CI"),
    reason="compile-only backends not installed (make aot-deps)")


def _aot(*args, env=None):
  e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  e.update(env or {})
  return subprocess.run([sys.executable, "-m", "train.aot", *args], cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=600)


def _report(*args):
  p = _aot("--config", TINY, "--json", "--programs", "train", *args)
  assert p.stdout.strip(), p.stderr[-2000:]
  return p, json.loads(p.stdout.strip().splitlines()[-1])


def test_plain_processes_never_see_the_backends():
  assert not any(os.path.abspath(p) == SITE for p in sys.path)
  assert jax.default_backend() == "cpu" and "JAX_SKIP_CUDA_CONSTRAINTS_CHECK" not in os.environ
  import importlib.util
  assert importlib.util.find_spec("jax_cuda12_plugin") is None
  assert importlib.util.find_spec("libtpu") is None


def test_refuses_bad_input_in_one_line():
  p = _aot("--config", TINY, "--target", "h100", env={"MEDVLM_AOT_SITE": "/nonexistent"})
  last = p.stderr.strip().splitlines()[-1]
  assert p.returncode == 2 and last.startswith("error:") and "make aot-deps" in last, p.stderr


def _auto_attention_text(platform, mesh=None):
  q = jax.ShapeDtypeStruct((8, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 256, 2, 128), jnp.bfloat16)

  def f(q, k, v):
    with attention.compiling_for(platform):
      if mesh is None:
        return attention.attend(q, k, v, impl="auto")
      with activation_sharding(mesh):
        return attention.attend(q, k, v, impl="auto")
  return jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()


def test_auto_attention_follows_the_target():
  assert attention.platform() == "cpu"
  with attention.compiling_for("gpu"):
    assert attention.platform() == "gpu"
    with attention.compiling_for("tpu"):
      assert attention.platform() == "tpu"
  assert attention.platform() == "cpu"
  assert "tpu_custom_call" in _auto_attention_text("tpu")   # splash, a Mosaic kernel
  assert "tpu_custom_call" not in _auto_attention_text("cpu")
  # On a mesh the kernel runs per device (XLA does not partition Mosaic calls): batch over fsdp.
  text = _auto_attention_text("tpu", make_mesh((1, 8, 1), jax.devices()))
  assert "tpu_custom_call" in text and "manual" in text


def test_hlo_readers_against_hand_counts():
  hlo = """
  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), dimensions={0}
  %ars = (f32[256]{0}, f32[256]{0}) all-reduce-start(f32[256]{0} %a), to_apply=%add
  %ard = f32[256]{0} all-reduce-done((f32[256]{0}, f32[256]{0}) %ars)
  ROOT %rs = f32[2,4]{1,0} reduce-scatter(f32[16,4]{1,0} %b), dimensions={0}
  %c = bf16[2,3]{1,0} custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax"
  %d = f32[1]{0} custom-call(%q), custom_call_target="tpu_custom_call"
  """
  got = aot_report.collectives(hlo)
  assert got == {"all-gather": (1, 8 * 1024 * 2), "all-reduce": (1, 256 * 4),
                 "reduce-scatter": (1, 2 * 4 * 4)}
  assert aot_report.kernels(hlo) == {"cuDNN fMHA": 1, "Mosaic (Pallas TPU / splash)": 1}


def _state_bytes(n_devices):
  """Per-device bytes of the tiny config's train state + frozen weights + batch, summed from
  the plan's shapes and shardings (not from XLA)."""
  from train import aot_programs, plan as plan_lib
  from train.main import load_config
  config = load_config(TINY)
  mesh = make_mesh((1, n_devices, 1), jax.devices()[:n_devices])
  p = plan_lib.plan(config, mesh, 10)
  state, frozen = plan_lib.abstract_state(p)
  dcfg = aot_programs.data_config(config, p.config, tokenizer=False)
  batch = aot_programs.abstract_batch(dcfg, False, dcfg.global_batch, mesh)
  total = 0
  for x in jax.tree_util.tree_leaves((state, frozen, batch)):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


@pytest.mark.slow
@needs_backends
def test_gpu_target_compiles_with_cudnn_attention():
  p, r = _report("--target", "h100")
  assert p.returncode == 0, p.stderr[-2000:]
  assert r["attention"] == "auto -> cudnn" and r["target"]["devices"] == 1
  step = r["programs"][0]
  assert step["program"] == "train_step" and step["fits"]
  assert step["memory"]["argument"] == _state_bytes(1)   # XLA's buffers = the plan's arrays
  assert 0 < step["memory"]["peak"] < step["limit"]
  assert step["kernels"].get("cuDNN fMHA", 0) >= 2       # forward and backward
  assert step["estimate"]["label"].startswith("estimate")


@pytest.mark.slow
@needs_backends
def test_tpu_target_compiles_with_splash_and_counts_flops():
  p, r = _report("--target", "v5e-8")
  assert p.returncode == 0, p.stderr[-2000:]
  assert r["attention"] == "auto -> splash" and r["mesh"]["fsdp"] == 8
  step = r["programs"][0]
  assert step["kernels"].get("Mosaic (Pallas TPU / splash)", 0) >= 3   # fwd, dq, dkv
  # XLA:TPU pads small arrays to its tiles: a few KiB over the plan's bytes
  assert step["memory"]["argument"] == pytest.approx(_state_bytes(8), rel=0.01)
  assert "all-gather" in step["collectives"]   # fsdp gathers the weights
  # one decoder layer: XLA's count of the compiled step is the analytic model count (+-10%)
  assert step["xla_flops"] == pytest.approx(step["model_flops_per_device"], rel=0.1)


@pytest.mark.slow
@needs_backends
def test_does_not_fit_is_reported_with_a_nonzero_exit():
  # a 1M x 2048 trainable embedding + LM head with Adam: ~50 GiB of state over 8 x 16 GiB
  big = ["--config.model.arch.llm.vocab_size=1048576", "--config.model.arch.llm.hidden=2048",
         "--config.model.arch.image_token_id=1048575", "--config.mesh.shape=(1,1,1)",
         "--config.mesh.num_devices=1"]
  p = _aot("--config", TINY, "--target", "v5e-8", "--programs", "train", *big)
  assert p.returncode == 1, p.stderr[-2000:]
  assert "DOES NOT FIT" in p.stdout
