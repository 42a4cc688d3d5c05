"""Serving benchmark (issue 23): the continuous-batching engine vs the arrival batching it replaced
vs transformers' own continuous batching, on one mixed workload, plus `evaluation.vqa run` over
1,000 questions against the same baseline.

Workload (bench/serve_load.py): questions of 4..160 words, every other one with an image,
max_tokens uniform in 8..256, greedy with `ignore_eos` (every answer is exactly max_tokens long,
so every system does the same work). Scenarios: closed loops of 1/8/32/64 clients and open loops
of Poisson arrivals at several rates; per scenario req/s, output tok/s, time to first token and
inter-token latency (gaps between streamed chunks) p50/p99, as the streaming client sees them.

Systems, each a `python -m serve` process on loopback (HTTP + SSE, like a user's):
  engine    this tree's server (the continuous-batching engine)
  arrival   the server of --baseline-rev (default c182632, the commit before the engine), run
            from a `git archive` of that revision in a temporary folder: no legacy code is kept
            in this tree
  hf        transformers' ContinuousBatchingManager (what `generate_batch` runs) on the same
            weights exported by `python -m convert export --to hf`, text-only rows, in process
Each server is warmed with one pass of the largest closed loop before it is measured.

  python -m bench.serve                 # everything, on the tiny model (CPU, ~20 minutes)
  python -m bench.serve --ckpt CKPT --clients 1 8 32 128 --hf-clients 1 32 128   # a real model
  python -m bench.serve --quick         # a smoke run: few requests, one scenario of each kind
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

from bench.env import device, versions
from bench import serve_load as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "bench"
CONTEXT = 1024


def _png_uri(seed: int) -> str:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)).save(
      buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def baseline_tree(rev: str, dest: str) -> str:
  """`rev`'s files (git archive) under dest/: the old server, run from there, not kept here."""
  os.makedirs(dest)
  archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev],
                           capture_output=True, check=True).stdout
  subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
  return dest


class Server:
  """`python -m serve` from `tree` on a free loopback port; its log goes to log_path."""

  def __init__(self, tree: str, ckpt: str, log_path: str, extra=()):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    self.port = sock.getsockname()[1]
    sock.close()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--ckpt", ckpt, "--port", str(self.port),
         "--served-model-name", MODEL, "--max-queue", "100000", "--max-tokens-limit", "256",
         "--max-new-tokens", "256", *extra], cwd=tree, stdout=self.log, stderr=self.log,
        env=dict(os.environ, PYTHONPATH=tree))
    import httpx
    deadline = time.monotonic() + 900
    while True:
      try:
        if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      if self.proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"the server in {tree} did not start: see {log_path}")
      time.sleep(0.5)

  def close(self) -> None:
    self.proc.send_signal(signal.SIGINT)
    try:
      self.proc.wait(60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()


def scenarios(args) -> list:
  """(name, kind, value, n requests, images) of every measurement; the text-only loop at 32
  clients is the one transformers' continuous batching (text-only) is compared with."""
  n = lambda c: max(args.min_requests, args.per_client * c)
  out = [(f"closed {c}", "clients", c, n(c), True) for c in args.clients]
  out += [(f"poisson {r:g}/s", "rate", r, args.poisson_requests, True) for r in args.rates]
  c = 32 if 32 in args.clients else max(args.clients)
  return out + [(f"closed {c} text-only", "clients", c, n(c), False)]


def _seed(scenario: str) -> int:
  """A scenario's workload seed; its text-only variant draws the same questions and lengths."""
  return zlib.crc32(scenario.replace(" text-only", "").encode())


def measure_server(url: str, args, uris: list, log, results: dict) -> None:
  """Each scenario run `--passes` times, measured the last time. What a server compiles as new
  shapes arrive (the arrival batcher: per batch size, prompt and cache length) lands in the
  persistent compilation cache, which a second pass (or an earlier run) has filled."""
  for name, kind, value, n, images in scenarios(args):
    reqs = L.workload(n, _seed(name), uris, images=images)
    for _ in range(args.passes):
      results[name] = (L.closed_loop(url, MODEL, reqs, value) if kind == "clients"
                       else L.open_loop(url, MODEL, reqs, value, seed=_seed(name)))
    log(name, results[name])


def measure_hf(hf_dir: str, ckpt: str, args, log, results: dict) -> None:
  from bench.serve_hf import HFContinuous
  from serve.prompt import build_prompt
  from data.tokenizer import load_tokenizer
  from vlm.checkpoint import load_config
  config, tok = load_config(ckpt), load_tokenizer(ckpt)
  rows = lambda reqs: [(build_prompt(config, tok, r.question, []).ids, r.max_tokens)
                       for r in reqs]
  hf = HFContinuous(hf_dir, slots=max(args.hf_clients), context=config.llm.max_positions)
  try:
    hf.run(rows(L.workload(max(args.clients) * 2, 99, ["-"], images=False)),
           clients=max(args.clients))
    for name, kind, value, n, _ in scenarios(args):
      if name.endswith("text-only") or kind == "rate" or value not in args.hf_clients:
        continue
      r = rows(L.workload(n, _seed(name), ["-"], images=False))
      results[name] = (hf.run(r, clients=value) if kind == "clients"
                       else hf.run(r, rate=value, seed=_seed(name)))
      log(name, results[name])
  finally:
    hf.close()


def vqa_files(tmp: str, n: int) -> tuple:
  """A LLaVA-Med test.json of n questions over 16 images."""
  from PIL import Image
  root = os.path.join(tmp, "vqa_images")
  os.makedirs(root)
  for k in range(16):
    Image.fromarray(np.random.default_rng(k).integers(0, 256, (64, 64, 3), np.uint8)).save(
        os.path.join(root, f"{k}.png"))
  rng = np.random.default_rng(7)
  recs = [{"id": i, "image": f"{i % 16}.png", "answer_type": "OPEN", "conversations": [
      {"from": "human", "value": "<image>\n" + " ".join(rng.choice(L.WORDS, int(rng.integers(
          3, 30)))) + "?"}, {"from": "gpt", "value": "x"}]} for i in range(n)]
  path = os.path.join(tmp, "vqa_test.json")
  with open(path, "w") as f:
    json.dump(recs, f)
  return path, root


def time_vqa(tree: str, ckpt: str, test_json: str, root: str, out: str, args) -> float:
  t = time.perf_counter()
  subprocess.run([sys.executable, "-m", "evaluation.vqa", "run", "--ckpt", ckpt, "--test-json",
                  test_json, "--image-root", root, "--out", out, "--max-new-tokens",
                  str(args.vqa_new_tokens)], cwd=tree, check=True, capture_output=True,
                 env=dict(os.environ, PYTHONPATH=tree))
  return time.perf_counter() - t


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", help="a checkpoint of this project (default: the tiny test Llava "
                 f"with a {CONTEXT}-token context, built here); transformers runs its export")
  p.add_argument("--baseline-rev", default="c182632",
                 help="git revision whose server is the arrival-batching baseline")
  p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
  p.add_argument("--rates", type=float, nargs="+", default=[2, 8],
                 help="Poisson arrival rates, requests/s")
  p.add_argument("--per-client", type=int, default=1, help="closed loop: requests per client")
  p.add_argument("--min-requests", type=int, default=8)
  p.add_argument("--poisson-requests", type=int, default=24)
  p.add_argument("--hf-clients", type=int, nargs="+", default=[1, 32],
                 help="the closed loops transformers runs (it is the slowest side on a CPU)")
  p.add_argument("--vqa-questions", type=int, default=1000)
  p.add_argument("--vqa-new-tokens", type=int, default=16)
  p.add_argument("--passes", type=int, default=1,
                 help="runs of each scenario on a server, the last one measured")
  p.add_argument("--engine-args", default="--slots 32",
                 help="extra flags for this tree's server")
  p.add_argument("--baseline-args", default="--max-batch 32",
                 help="extra flags for the baseline's server")
  p.add_argument("--systems", nargs="+", default=["engine", "arrival", "hf", "vqa"],
                 choices=["engine", "arrival", "hf", "vqa"])
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 1 and 4 clients, one rate, few requests, 40 VQA questions")
  p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
  args = p.parse_args(argv)
  if args.quick:
    args.clients, args.rates, args.per_client, args.min_requests = [1, 4], [4], 2, 4
    args.hf_clients = [4]
    args.poisson_requests, args.vqa_questions = 8, 40
  sys.path.insert(0, ROOT)
  from tests.tiny_ckpt import llava_checkpoint
  tmp = tempfile.mkdtemp(prefix="bench_serve_")
  started = datetime.datetime.now(datetime.timezone.utc)

  def log(*what):
    print(f"[{time.strftime('%H:%M:%S')}]", *[json.dumps(w) if isinstance(w, dict) else w
                                              for w in what], file=sys.stderr, flush=True)

  results, vqa, failed = {}, {}, []

  @contextlib.contextmanager
  def attempt(what):
    """A system that fails is reported as failed; the others still run."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - recorded in the report
      log(f"{what} FAILED: {type(e).__name__}: {e}")
      failed.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")

  try:
    ckpt = args.ckpt or llava_checkpoint(tmp, context=CONTEXT)
    uris = [_png_uri(k) for k in range(8)]
    base = None
    if {"arrival", "vqa"} & set(args.systems):
      base = baseline_tree(args.baseline_rev, os.path.join(tmp, "baseline"))
    for system, tree, extra in (("engine", ROOT, args.engine_args),
                                ("arrival", base, args.baseline_args)):
      if system not in args.systems:
        continue
      log(f"{system}: starting the server")
      with attempt(system):
        srv = Server(tree, ckpt, os.path.join(tmp, f"{system}.log"), extra.split())
        try:
          measure_server(srv.url, args, uris, lambda n, r: log(system, n, r),
                         results.setdefault(system, {}))
        finally:
          srv.close()
    if "hf" in args.systems:
      with attempt("hf"):
        hf_dir = os.path.join(tmp, "hf")
        subprocess.run([sys.executable, "-m", "convert", "export", ckpt, "--to", "hf", "--out",
                        hf_dir], cwd=ROOT, check=True, capture_output=True)
        measure_hf(hf_dir, ckpt, args, lambda n, r: log("hf", n, r),
                   results.setdefault("hf (text-only)", {}))
    if "vqa" in args.systems:
      test_json, root = vqa_files(tmp, args.vqa_questions)
      for system, tree in (("engine", ROOT), ("arrival", base)):
        with attempt(f"vqa {system}"):
          vqa[system] = time_vqa(tree, ckpt, test_json, root,
                                 os.path.join(tmp, f"{system}.jsonl"), args)
          log("vqa", system, f"{vqa[system]:.1f} s")
  finally:
    if args.keep:
      log(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)
  print(report(args, results, vqa, started))
  for f in failed:
    print(f"- FAILED {f}")


def _fmt(r: dict) -> str:
  return (f"{r['req_s']:.2f} | {r['tok_s']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
          f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f}")


def targets(results: dict) -> list:
  """Issue 23's targets at 32 clients, each with its figures and met / not met."""
  out = []
  e, a, h = (results.get(k, {}) for k in ("engine", "arrival", "hf (text-only)"))
  if "closed 32" in e and "closed 32" in a:
    x = e["closed 32"]["req_s"] / a["closed 32"]["req_s"]
    out.append(f"32 clients, mixed: engine / arrival batching req/s = {x:.2f}x (target >= 2x: "
               f"{'met' if x >= 2 else 'NOT met'})")
  if "closed 32 text-only" in e and "closed 32" in h:   # the same text-only requests
    x = e["closed 32 text-only"]["req_s"] / h["closed 32"]["req_s"]
    out.append(f"32 clients, text-only: engine / transformers continuous batching req/s = "
               f"{x:.2f}x (target >= 1x: {'met' if x >= 1 else 'NOT met'})")
  if "closed 32" in e and "closed 1" in e:
    x = e["closed 32"]["ttft_p99_ms"] / e["closed 1"]["ttft_p99_ms"]
    out.append(f"TTFT p99 with 31 other streams / alone (1 client) = {x:.2f}x (target <= 3x: "
               f"{'met' if x <= 3 else 'NOT met'})")
  return out


def report(args, results: dict, vqa: dict, started) -> str:
  cmd = " ".join(["python -m bench.serve"] + (sys.argv[1:] if argv_is_cli() else []))
  lines = [f"- device: {device()}, {os.cpu_count()} CPU cores",
           f"- versions: {versions('jax', 'jaxlib', 'torch', 'transformers', 'fastapi', 'uvicorn')}",
           f"- date: {started.strftime('%Y-%m-%d %H:%M')} UTC; command: `{cmd}`",
           f"- baseline: the server of {args.baseline_rev} (arrival batching, "
           f"`{args.baseline_args}`); engine flags: `{args.engine_args or '(defaults)'}`", "",
           "| system | scenario | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
           "ITL p99 ms |", "|---|---|---|---|---|---|---|---|"]
  for system, rows in results.items():
    for name, r in rows.items():
      lines.append(f"| {system} | {name} | {_fmt(r)} |")
  if vqa:
    lines += ["", f"`evaluation.vqa run`, {args.vqa_questions} questions with images, "
              f"--max-new-tokens {args.vqa_new_tokens}: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in vqa.items())
              + (f" ({vqa['arrival'] / vqa['engine']:.2f}x)" if len(vqa) == 2 else "")]
  lines += [""] + [f"- {t}" for t in targets(results)]
  return "\n".join(lines)


def argv_is_cli() -> bool:
  return os.path.basename(sys.argv[0]) in ("serve.py", "__main__.py") or "-m" in sys.orig_argv


if __name__ == "__main__":
  main()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)   # past the report: do not wait on the HTTP clients' and engines' idle threads
