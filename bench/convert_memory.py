"""Peak RSS of `python -m convert import --from hf` on a synthetic multi-shard Llama checkpoint.

The importer reads one tensor at a time (no memory map held open) and builds the parameter tree
once, so peak RSS should stay near checkpoint size + the interpreter's own footprint.

  python bench/convert_memory.py --gb 2 [--dtype bfloat16] [--shard-mb 500] [--workdir DIR]

Prints one JSON line: checkpoint bytes, peak RSS of the import (ru_maxrss of the child), the
baseline RSS of a child that only imports the same modules, and the ratios. Every step runs in its
own child and this parent imports only the standard library: a child's ru_maxrss starts from the
parent's RSS at fork, so a parent holding the generated tensors would inflate the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, MLP, HEADS, KV, VOCAB = 2048, 5632, 16, 4, 32000


def layer_shapes(hd=HIDDEN // HEADS) -> dict:
  return {"self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
          "self_attn.k_proj.weight": (KV * hd, HIDDEN),
          "self_attn.v_proj.weight": (KV * hd, HIDDEN),
          "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
          "mlp.gate_proj.weight": (MLP, HIDDEN), "mlp.up_proj.weight": (MLP, HIDDEN),
          "mlp.down_proj.weight": (HIDDEN, MLP), "input_layernorm.weight": (HIDDEN,),
          "post_attention_layernorm.weight": (HIDDEN,)}


def write_checkpoint(path, gb: float, dtype: str, shard_bytes: int) -> int:
  """A random HF LlamaForCausalLM dir of about `gb` GB, sharded with an index; returns bytes."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  item = np.dtype(dtype).itemsize
  per_layer = sum(int(np.prod(s)) for s in layer_shapes().values()) * item
  fixed = (2 * VOCAB * HIDDEN + HIDDEN) * item
  layers = max(1, round((gb * 1e9 - fixed) / per_layer))
  tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
             ("lm_head.weight", (VOCAB, HIDDEN))]
  tensors += [(f"model.layers.{i}.{k}", s)
              for i in range(layers) for k, s in layer_shapes().items()]
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  buf, size, shards, weight_map, total = {}, 0, [], {}, 0

  def flush():
    name = f"model-{len(shards) + 1:05d}.safetensors"
    save_file(buf, os.path.join(path, name), metadata={"format": "pt"})
    shards.append(name)
    weight_map.update({k: name for k in buf})
    buf.clear()

  for name, shape in tensors:
    x = (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
    if size and size + x.nbytes > shard_bytes:
      flush()
      size = 0
    buf[name] = x
    size += x.nbytes
    total += x.nbytes
  flush()
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return total


def peak_rss(cmd) -> tuple:
  """(peak RSS bytes, seconds) of a child process (its own ru_maxrss via wait4)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  t = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"failed: {' '.join(cmd)}")
  return usage.ru_maxrss * 1024, time.time() - t


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gb", type=float, default=2.0, help="checkpoint size")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--shard-mb", type=int, default=500)
  p.add_argument("--workdir", help="where to write (default: a temp dir, removed after)")
  p.add_argument("--write-only", help=argparse.SUPPRESS)  # the generator child
  a = p.parse_args(argv)
  if a.write_only:
    print(write_checkpoint(a.write_only, a.gb, a.dtype, a.shard_mb * 10**6))
    return None
  work = a.workdir or tempfile.mkdtemp(prefix="convert_memory_")
  try:
    hf_dir = os.path.join(work, "hf")
    size = int(subprocess.run(
        [sys.executable, __file__, "--gb", str(a.gb), "--dtype", a.dtype, "--shard-mb",
         str(a.shard_mb), "--write-only", hf_dir], check=True, capture_output=True,
        text=True).stdout.split()[-1])
    base, _ = peak_rss([sys.executable, "-c", "import jax, orbax.checkpoint, convert.cli, "
                        "vlm.hf, vlm.model, vlm.checkpoint; jax.devices()"])
    peak, secs = peak_rss([sys.executable, "-m", "convert", "import", "--from", "hf", hf_dir,
                           "--out", os.path.join(work, "ckpt")])
    out = {"checkpoint_gb": round(size / 1e9, 3), "dtype": a.dtype,
           "peak_rss_gb": round(peak / 1e9, 3), "baseline_rss_gb": round(base / 1e9, 3),
           "peak_over_size": round(peak / size, 3),
           "peak_minus_baseline_over_size": round((peak - base) / size, 3),
           "import_seconds": round(secs, 1)}
    print(json.dumps(out))
    return out
  finally:
    if not a.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
