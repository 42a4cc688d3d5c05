"""Generation speed on one GPU: serve.generate (JAX) vs HF transformers `generate` (PyTorch).

A Llama-3-8B-shaped decoder with random bf16 weights, greedy, no stop tokens: a prompt of 1024
tokens (729 of them where Llama3-Med puts its image features; the vision tower is left out, decode
speed is the LLM's) + 256 new tokens, batch 1 and 32. Reported per side: prefill seconds, decode
tokens/s (new tokens / decode time, prefill excluded) and end-to-end tokens/s, plus the weight
bytes each decode step must read (the memory-bound ceiling is HBM bandwidth / that). Each side runs
in its own process so the two frameworks never share GPU memory. HF uses a dynamic cache at batch
1 and a static cache above (as the issue's reference measurement), `--hf-cache` overrides.

  python -m bench.generate                    # both sides, batch 1 and 32 (GPU)
  python -m bench.generate --impl jax --batch 1
  python -m bench.generate --smoke            # tiny shapes on CPU: checks the script
  python -m bench.generate --impl jax --batch 1 --layout scan --xla-flags base dynamic_slice_fusion

`--xla-flags SET ...` runs our side once per XLA flag set (bench/xla_flags.py), each in its own
process; the rows are labelled with the set's name.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
import sys
import time

import numpy as np

from bench import xla_flags
from bench.env import versions

LLAMA3_8B = dict(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                 mlp=14336, theta=500000.0)
# A CPU-sized model for comparing our own variants (layouts) on a host without a GPU.
SMALL = dict(vocab=1000, hidden=256, layers=8, heads=8, kv_heads=2, head_dim=32, mlp=512,
             theta=500000.0)
SMOKE = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128,
             theta=500000.0)


def _prompt(args, seed=0) -> np.ndarray:
  """[batch, prompt] ids: some text, then a run of `image_tokens` placeholder ids, then text."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, args.shape["vocab"] - 1, size=(args.batch, args.prompt))
  start = min(5, args.prompt - args.image_tokens)
  ids[:, start:start + args.image_tokens] = args.shape["vocab"] - 1
  return ids.astype(np.int32)


def _weight_bytes(s) -> int:
  per_layer = s["hidden"] * (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"] + (
      s["heads"] * s["head_dim"] * s["hidden"]) + 3 * s["hidden"] * s["mlp"]
  return 2 * (s["layers"] * per_layer + 2 * s["vocab"] * s["hidden"])  # bf16; embed + head


# --- JAX ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _random_params(config):
  """bf16 benchmark weights for `config`, made on the device (bench/weights.py)."""
  import jax
  import jax.numpy as jnp
  from bench.weights import hash_fill
  from vlm.model import abstract_params
  return hash_fill(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                                          abstract_params(config, boxed=False)))


def run_jax(args) -> dict:
  import jax
  from vlm.config import LlamaConfig, Runtime, VLMConfig
  from serve.generate import Generator
  from serve.sampling import SamplingParams
  from vlm.model import VLM
  from serve.prompt import Prompt
  s = args.shape
  llm = LlamaConfig(vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"],
                    heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                    mlp_dim=s["mlp"], rope_theta=s["theta"], max_positions=8192)
  dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  config = VLMConfig(llm=llm, template="llama3")
  params = _random_params(config)
  layout = {"auto": None, "scan": True, "unstacked": False}[args.layout]
  gen = Generator(VLM(config, Runtime(dtype=dtype)), params, scan_layers=layout)
  prompts = [Prompt(row) for row in _prompt(args)]
  gc = SamplingParams(max_tokens=args.new_tokens, stop_token_ids=())
  gen.generate(prompts, gc, slots=args.batch)  # compile
  runs = []
  for _ in range(args.repeats):
    out = gen.generate(prompts, gc, slots=args.batch)
    assert all(len(o.tokens) == args.new_tokens for o in out)
    runs.append(dict(gen.timings))
  best = min(runs, key=lambda t: t["prefill_s"] + t["decode_s"])
  impl = "jax" if args.layout == "auto" else f"jax ({args.layout} layers)"
  return {"impl": impl, "prefill_s": best["prefill_s"], "decode_s": best["decode_s"],
          "device": str(jax.devices()[0].device_kind), "cache_len": best["cache_len"]}


# --- HF transformers ---------------------------------------------------------------------------

def run_hf(args) -> dict:
  import torch
  import transformers as T
  s = args.shape
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if not args.smoke and dev != "cuda":
    raise SystemExit("the HF side needs torch with CUDA on this machine")
  dtype = torch.float32 if args.smoke else torch.bfloat16
  cfg = T.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                      intermediate_size=s["mlp"], max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": s["theta"]},
                      eos_token_id=None, pad_token_id=0, bos_token_id=None)
  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  with torch.device(dev):
    model = T.LlamaForCausalLM(cfg).eval()
  torch.set_default_dtype(default)
  ids = torch.tensor(_prompt(args), device=dev)
  cache = args.hf_cache if args.hf_cache != "auto" else ("dynamic" if args.batch == 1 else
                                                         "static")
  kw = dict(do_sample=False, attention_mask=torch.ones_like(ids))
  if cache == "static":
    kw["cache_implementation"] = "static"
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def timed(n):
    sync()
    t = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    sync()
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - t

  # Warm-up: a static cache compiles its decode step, so it runs the full length; a dynamic cache
  # compiles nothing and 16 tokens warm its kernels (at batch 1, 256 would cost ~17 s of GPU time).
  timed(args.new_tokens if cache == "static" else min(16, args.new_tokens))
  timed(1)
  prefill = min(timed(1) for _ in range(args.repeats))
  total = min(timed(args.new_tokens) for _ in range(args.repeats))
  return {"impl": f"hf ({cache} cache)", "prefill_s": prefill, "decode_s": total - prefill,
          "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


# --- driver ------------------------------------------------------------------------------------

def _child(args, impl, batch, flag_set=None) -> dict:
  """One side at one batch size in a fresh process (GPU memory is not shared), with the
  (name, XLA_FLAGS) of `flag_set`, if any, appended to the environment's."""
  cmd = [sys.executable, "-m", "bench.generate", "--impl", impl, "--batch", str(batch),
         "--json", "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
         "--image-tokens", str(args.image_tokens), "--repeats", str(args.repeats),
         "--hf-cache", args.hf_cache, "--layout", args.layout] + (
             ["--small"] * args.small + ["--smoke"] * args.smoke)
  name, flags = flag_set or ("", "")
  res = subprocess.run(cmd, capture_output=True, text=True,
                       env=xla_flags.environ(flags) if name else None)
  label = f"{impl} [{name}]" if name else impl
  if res.returncode != 0:
    return {"impl": label, "batch": batch, "note": (res.stderr.strip().splitlines() or ["?"])[-1]}
  r = json.loads(res.stdout.strip().splitlines()[-1])
  return {**r, "impl": f"{r['impl']} [{name}]"} if name else r


def measure(args, impl, batch) -> dict:
  a = argparse.Namespace(**{**vars(args), "batch": batch})
  try:
    r = run_jax(a) if impl == "jax" else run_hf(a)
  except Exception as e:  # noqa: BLE001 - an OOM or missing CUDA is a table note, not a crash
    return {"impl": impl, "batch": batch, "note": f"{type(e).__name__}: {str(e)[:100]}"}
  r.update(batch=batch, new_tokens=args.new_tokens)
  r["decode_tok_s"] = batch * args.new_tokens / r["decode_s"]
  r["e2e_tok_s"] = batch * args.new_tokens / (r["prefill_s"] + r["decode_s"])
  r["step_ms"] = 1e3 * r["decode_s"] / args.new_tokens
  return r


def table(args, rows) -> str:
  wb = _weight_bytes(args.shape)
  device = next((r["device"] for r in rows if "device" in r), "?")
  lines = ["## Generation benchmark", "",
           f"- device: {device}",
           f"- versions: {versions('jax', 'jaxlib', 'torch', 'transformers')}",
           f"- date: {datetime.date.today().isoformat()}",
           f"- command: `{' '.join(['python -m bench.generate'] + sys.argv[1:])}`",
           f"- shape: {args.shape}, prompt {args.prompt} ({args.image_tokens} image positions), "
           f"{args.new_tokens} new tokens, greedy; weights {wb / 1e9:.2f} GB read per decode step; "
           f"best of {args.repeats} runs after a warm-up", "",
           "| impl | batch | prefill s | decode ms/step | decode tok/s | end-to-end tok/s | "
           "weight GB/s | decode vs HF |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "note" in r:
      lines.append(f"| {r['impl']} | {r['batch']} | - | - | - | - | - | {r['note']} |")
      continue
    hf = next((h for h in rows if h["impl"].startswith("hf") and h["batch"] == r["batch"]
               and "decode_tok_s" in h), None)
    rel = f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x" if hf else ""
    lines.append(f"| {r['impl']} | {r['batch']} | {r['prefill_s']:.3f} | {r['step_ms']:.2f} | "
                 f"{r['decode_tok_s']:.1f} | {r['e2e_tok_s']:.1f} | "
                 f"{wb / (r['step_ms'] / 1e3) / 1e9:.0f} | {rel} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--impl", choices=("jax", "hf", "both"), default="both")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  p.add_argument("--prompt", type=int, default=1024)
  p.add_argument("--image-tokens", type=int, default=729)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--hf-cache", choices=("auto", "dynamic", "static"), default="auto")
  p.add_argument("--layout", choices=("auto", "scan", "unstacked"), default="auto",
                 help="our decoder's parameter layout (serve.generate.Generator scan_layers; auto: "
                      "one subtree per layer except on TPU)")
  p.add_argument("--xla-flags", nargs="+", default=None, metavar="SET",
                 help="our side once per XLA flag set, each its own process (bench/xla_flags.py "
                      f"names: {', '.join(xla_flags.SETS)}; or NAME=--xla_flag=value ...)")
  p.add_argument("--json", action="store_true", help="print one JSON result (child mode)")
  p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, in one process")
  p.add_argument("--small", action="store_true",
                 help="an 8-layer, 256-wide model (float32 off GPU): our variants on a CPU host")
  args = p.parse_args(argv)
  args.shape = SMOKE if args.smoke else SMALL if args.small else LLAMA3_8B
  if args.smoke:
    args.prompt, args.image_tokens, args.new_tokens, args.repeats = 24, 9, 6, 1
    args.batch, args.hf_cache = [2], "dynamic"  # a static cache would torch.compile on CPU
  impls = ("jax", "hf") if args.impl == "both" else (args.impl,)
  if args.json:
    print(json.dumps(measure(args, impls[0], args.batch[0])))
    return
  try:
    sets = [xla_flags.parse(spec) for spec in args.xla_flags or ()]
  except ValueError as e:
    p.error(str(e))
  rows = []
  for batch in args.batch:
    for impl in impls:
      for flag_set in (sets if impl == "jax" and sets else [None]):
        # flag sets need a process of their own, on CPU too (XLA reads XLA_FLAGS once)
        in_process = args.smoke and flag_set is None
        r = measure(args, impl, batch) if in_process else _child(args, impl, batch, flag_set)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)  # progress
  print(table(args, rows))


if __name__ == "__main__":
  main()
