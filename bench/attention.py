"""Attention speed on one GPU: the Pallas flash kernel vs cuDNN (through JAX), XLA and torch SDPA.

Dense case: B=4, H=32, D=128, causal, S in {1024, 2048, 4096, 8192}, forward and forward+backward
TFLOP/s (causal FLOPs halved: fwd 2 matmuls = 4*B*H*S^2*D / 2, backward 2.5x the forward).
Packed case: each row holds 8 samples marked by segment ids; the kernel takes the ids, cuDNN and
XLA take the equivalent dense [B, 1, S, S] mask. Its TFLOP/s count only the useful (in-sample,
causal) FLOPs, so every path is scored on the same work. Prints a markdown table with device,
versions, date and command, for docs/benchmarks.md.

  python -m bench.attention                 # the full run on a GPU
  python -m bench.attention --smoke         # tiny shapes on CPU, kernel in interpret mode
  python -m bench.attention --blocks block_q=128,block_k=128,num_stages=4   # try other tiles
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.env import device, versions
from vlm import attention
from vlm.kernels import flash_attention as fa


def _flops(b, h, s, d, causal, samples=1):
  """Forward matmul FLOPs of the useful (visible) score entries."""
  per = s // samples
  pairs = samples * per * per
  return 4 * b * h * d * (pairs / 2 if causal else pairs)


def _time_jax(fn, args, iters, warmup):
  """Median over 3 trials of the mean time of `iters` back-to-back calls (dispatch overlapped)."""
  out = fn(*args)
  jax.block_until_ready(out)
  for _ in range(warmup - 1):
    jax.block_until_ready(fn(*args))
  trials = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(iters):
      res = fn(*args)
    jax.block_until_ready(res)
    trials.append((time.perf_counter() - t) / iters)
  return float(np.median(trials)), out


def _jax_fns(impl_fn):
  fwd = jax.jit(impl_fn)
  fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(impl_fn, q, k, v)[1](do))
  return fwd, fwd_bwd


def _torch_sdpa(b, h, s, d, causal, dtype_name, iters, warmup, seed):
  """Median seconds (fwd, fwd+bwd) of torch SDPA (its default backend choice), or a reason."""
  try:
    import torch
  except ImportError:
    return "torch not installed"
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if jax.default_backend() == "gpu" and dev != "cuda":
    return "torch has no CUDA"
  dtype = getattr(torch, dtype_name)
  gen = torch.Generator(device=dev).manual_seed(seed)
  q, k, v, do = (torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=gen)
                 for _ in range(4))
  q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def fwd():
    with torch.no_grad():
      return sdpa(q, k, v, is_causal=causal)

  def fwd_bwd():
    return torch.autograd.grad(sdpa(q, k, v, is_causal=causal), (q, k, v), do)

  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  res = []
  for fn in (fwd, fwd_bwd):
    for _ in range(warmup):
      fn()
    sync()
    trials = []
    for _ in range(3):
      t = time.perf_counter()
      for _ in range(iters):
        fn()
      sync()
      trials.append((time.perf_counter() - t) / iters)
    res.append(float(np.median(trials)))
  return tuple(res)


def _run_jax(name, impl_fn, args, flops, iters, warmup, ref=None):
  """One table row and the outputs (out, dq, dk, dv) in float32. The row holds times, TFLOP/s
  and the max |x - ref| over the output and over the grads; a failure (OOM, no cuDNN) becomes a
  note instead of a crash."""
  fwd, fwd_bwd = _jax_fns(impl_fn)
  try:
    t_f, out = _time_jax(fwd, args[:3], iters, warmup)
    t_fb, grads = _time_jax(fwd_bwd, args, iters, warmup)
  except Exception as e:  # noqa: BLE001 - a failed path is a table note, not a crash
    return {"impl": name, "note": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}, None
  outs = [x.astype(jnp.float32) for x in (out, *grads)]
  err = None
  if ref is not None:
    diff = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(outs, ref)]
    err = (diff[0], max(diff[1:]))
  return {"impl": name, "fwd": t_f, "fwd_bwd": t_fb, "flops": flops, "err": err}, outs


def _row(r, base):
  if "note" in r:
    return f"| {r['impl']} | - | - | - | - | - | {r['note']} |"
  tf = r["flops"] / r["fwd"] / 1e12
  tfb = 3.5 * r["flops"] / r["fwd_bwd"] / 1e12
  rel = ""
  if base and "fwd" in base:
    rel = f"{base['fwd'] / r['fwd']:.2f}x / {base['fwd_bwd'] / r['fwd_bwd']:.2f}x"
  err = "" if r.get("err") is None else f"{r['err'][0]:.1e} / {r['err'][1]:.1e}"
  return (f"| {r['impl']} | {r['fwd'] * 1e3:.3f} | {tf:.1f} | {r['fwd_bwd'] * 1e3:.3f} | "
          f"{tfb:.1f} | {rel} | {err} |")


def _parse_blocks(text):
  if not text:
    return None
  kw = dict(item.split("=") for item in text.split(","))
  fields = {f.name for f in dataclasses.fields(fa.BlockSizes)}
  bad = set(kw) - fields
  if bad:
    raise SystemExit(f"--blocks: unknown fields {sorted(bad)}; known: {sorted(fields)}")
  return fa.BlockSizes(**{k: int(v) for k, v in kw.items()})


def _header(args):
  cmd = "python -m bench.attention " + " ".join(sys.argv[1:])
  return [f"## Attention benchmark ({'smoke, CPU interpret' if args.smoke else 'GPU'})", "",
          f"- device: {device()}",
          f"- versions: {versions('jax', 'jaxlib', 'torch')}",
          f"- date: {datetime.date.today().isoformat()}",
          f"- command: `{cmd.strip()}`",
          f"- shapes: B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, "
          f"causal; TFLOP/s with causal FLOPs halved, fwd+bwd = 3.5x fwd FLOPs; "
          f"time = median of 3 trials of {args.iters} back-to-back calls", ""]


def _table_head(title):
  return [f"### {title}", "",
          "| impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | speed vs cuDNN "
          "(fwd / fwd+bwd) | max abs err vs first row (out / grads) |",
          "|---|---|---|---|---|---|---|"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--samples", type=int, default=8, help="samples per row in the packed case")
  p.add_argument("--packed-seqs", type=int, nargs="*", default=[2048, 4096],
                 help="sequence lengths of the packed case (none: skip it)")
  p.add_argument("--impls", nargs="+", default=["pallas", "cudnn", "xla", "torch"],
                 choices=["pallas", "cudnn", "xla", "torch"])
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--blocks", default="", help="kernel tiles, e.g. block_q=128,block_k=64")
  p.add_argument("--profile", default="", metavar="DIR",
                 help="also trace fwd+bwd of pallas and cudnn at the last --seqs length and add "
                      "their kernel summaries (bench/profile.py): where the kernel's time goes")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes on CPU, Pallas in interpret mode (checks the script)")
  args = p.parse_args(argv)
  if args.smoke:
    args.seqs, args.packed_seqs, args.batch, args.heads, args.head_dim = [64], [64], 1, 2, 64
    args.iters, args.warmup, args.samples, args.dtype = 1, 1, 4, "float32"
    blocks = fa.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                           block_q_dq=32, block_k_dq=16)
  else:
    if jax.default_backend() != "gpu":
      raise SystemExit("bench.attention needs a GPU (use --smoke to check the script on CPU)")
    blocks = _parse_blocks(args.blocks)
  interpret = jax.default_backend() != "gpu"
  on_gpu = not interpret
  dtype = jnp.dtype(args.dtype)
  b, h, d = args.batch, args.heads, args.head_dim
  lines = _header(args)
  if blocks is not None:
    lines.insert(-1, f"- kernel tiles: {blocks}")

  def pallas(seg=None):
    return lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=True,
                                              interpret=interpret, block_sizes=blocks)

  def builtin(impl, seg=None):
    return lambda q, k, v: attention.attend(q, k, v, causal=True, segment_ids=seg, impl=impl)

  def inputs(s):
    ks = jax.random.split(jax.random.key(s), 4)
    return [jax.random.normal(kk, (b, s, h, d), dtype) for kk in ks]

  for s in args.seqs:
    args_ = inputs(s)
    flops = _flops(b, h, s, d, True)
    rows, ref = [], None
    order = [i for i in ("cudnn", "xla", "pallas", "torch") if i in args.impls]
    for impl in order:
      if impl == "torch":
        res = _torch_sdpa(b, h, s, d, True, args.dtype, args.iters, args.warmup, s)
        rows.append({"impl": "torch", "note": res} if isinstance(res, str) else
                    {"impl": "torch", "fwd": res[0], "fwd_bwd": res[1], "flops": flops})
        continue
      if impl == "cudnn" and not on_gpu:
        rows.append({"impl": "cudnn", "note": "needs a GPU"})
        continue
      fn = pallas() if impl == "pallas" else builtin(impl)
      row, out = _run_jax(impl, fn, args_, flops, args.iters, args.warmup, ref)
      ref = out if ref is None else ref
      rows.append(row)
    base = next((r for r in rows if r["impl"] == "cudnn" and "fwd" in r), None)
    lines += _table_head(f"S={s}") + [_row(r, base) for r in rows] + [""]
    print("\n".join(lines[-len(rows) - 5:]), file=sys.stderr, flush=True)  # progress

  for s in args.packed_seqs:
    args_ = inputs(s)
    seg = jnp.broadcast_to(jnp.repeat(jnp.arange(args.samples, dtype=jnp.int32),
                                      s // args.samples, total_repeat_length=s), (b, s))
    flops = _flops(b, h, s, d, True, samples=args.samples)
    rows, ref = [], None
    for impl in [i for i in ("cudnn", "xla", "pallas") if i in args.impls]:
      if impl == "cudnn" and not on_gpu:
        rows.append({"impl": "cudnn", "note": "needs a GPU"})
        continue
      fn = pallas(seg) if impl == "pallas" else builtin(impl, seg)
      name = impl if impl == "pallas" else f"{impl} (dense mask)"
      row, out = _run_jax(name, fn, args_, flops, args.iters, args.warmup, ref)
      ref = out if ref is None else ref
      rows.append(row)
    base = next((r for r in rows if r["impl"].startswith("cudnn") and "fwd" in r), None)
    lines += _table_head(f"packed: S={s}, {args.samples} samples per row (segment ids), "
                         "useful FLOPs") + [_row(r, base) for r in rows] + [""]
  if args.profile and args.seqs:
    lines += _profiles(args, {"pallas": pallas(), "cudnn": builtin("cudnn")}, inputs(args.seqs[-1]),
                       on_gpu)
  print("\n".join(lines))


def _profiles(args, fns: dict, qkvd, on_gpu) -> list:
  """Kernel summaries of 3 traced fwd+bwd calls per implementation (profile evidence for #6)."""
  import os
  from bench import profile
  out = []
  for name, fn in fns.items():
    if name == "cudnn" and not on_gpu:
      continue
    _, fwd_bwd = _jax_fns(fn)
    try:
      jax.block_until_ready(fwd_bwd(*qkvd))
      s = profile.trace_steps(lambda: fwd_bwd(*qkvd), 3, os.path.join(args.profile, name),
                              title=f"profile: {name} fwd+bwd, S={qkvd[0].shape[1]}")
      out += [s["text"], ""]
    except Exception as e:  # noqa: BLE001 - the tables stand without the profile
      out += [f"profile of {name} failed: {type(e).__name__}: {str(e)[:120]}", ""]
  return out


if __name__ == "__main__":
  main()
