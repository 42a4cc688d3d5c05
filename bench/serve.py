"""Serving throughput: requests/s and tokens/s at 1, 8 and 32 concurrent clients, `python -m serve`
(HTTP, batching by arrival, Generator) side by side with the HF transformers `generate` loop.

Each of C clients sends its requests one after another (a closed loop): an image + a question,
greedy, `ignore_eos` so every answer is exactly --new-tokens long. Ours is the real server (uvicorn
on loopback, the app of serve/server.py); the clients are threads speaking HTTP. The HF side is
what a plain PyTorch service does with the same model and prompts: one `generate` call per request
(one at a time, whatever C is), and, as its best case, C requests in one left-padded `generate`
call (static batching: every request of a batch waits for the batch).

  python -m bench.serve                   # the tiny test Llava on CPU (tests/tiny_ckpt.py)
  python -m bench.serve --ckpt CKPT --hf HF_DIR --new-tokens 128   # a real model (GPU)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from bench.env import device, versions

QUESTION = "What is shown in the image?"


def _image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _data_uri(img: np.ndarray) -> str:
  import base64
  import io

  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- ours: the server ----------------------------------------------------------------------------

def _post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with opener.open(req, timeout=600) as r:
    return json.loads(r.read())


def run_server(url: str, clients: int, per_client: int, new_tokens: int, uris: list) -> dict:
  """C closed-loop clients, each sending `per_client` requests; the clock runs from the common
  start to the last answer."""
  start, latencies, tokens = threading.Barrier(clients + 1), [], []
  lock = threading.Lock()

  def client(k):
    start.wait()
    for i in range(per_client):
      body = {"model": "bench", "temperature": 0, "max_tokens": new_tokens, "ignore_eos": True,
              "messages": [{"role": "user", "content": [
                  {"type": "image_url", "image_url": {"url": uris[(k + i) % len(uris)]}},
                  {"type": "text", "text": QUESTION}]}]}
      t = time.perf_counter()
      out = _post(url, body)
      with lock:
        latencies.append(time.perf_counter() - t)
        tokens.append(out["usage"]["completion_tokens"])

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    futures = [pool.submit(client, k) for k in range(clients)]
    start.wait()
    t0 = time.perf_counter()
    for f in futures:
      f.result()
    elapsed = time.perf_counter() - t0
  assert all(n == new_tokens for n in tokens), tokens
  return {"req_s": len(tokens) / elapsed, "tok_s": sum(tokens) / elapsed,
          "latency_s": float(np.mean(latencies))}


# --- HF transformers -----------------------------------------------------------------------------

class HFLoop:
  """The HF model of the same weights on the same prompts (our prompt ids, HF-normalized pixels)."""

  def __init__(self, hf_dir: str, prompts: list, config):
    import torch
    import transformers as T
    self.torch = torch
    self.dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = T.AutoConfig.from_pretrained(hf_dir)
    cls = (T.LlavaNextForConditionalGeneration if cfg.model_type == "llava_next"
           else T.LlavaForConditionalGeneration)
    dtype = torch.bfloat16 if self.dev == "cuda" else torch.float32
    self.model = cls.from_pretrained(hf_dir, dtype=dtype).to(self.dev).eval()
    mean = np.asarray(config.vision.mean, np.float32)
    std = np.asarray(config.vision.std, np.float32)
    self.rows = [(p.ids, ((p.pixels[0].astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1))
                 for p in prompts]
    self.dtype = dtype

  def generate(self, rows: list, new_tokens: int) -> float:
    """Seconds for one left-padded `generate` call over `rows`."""
    torch = self.torch
    width = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, (r, _) in enumerate(rows):
      ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    px = torch.tensor(np.stack([p for _, p in rows]), dtype=self.dtype, device=self.dev)
    sync = torch.cuda.synchronize if self.dev == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.no_grad():
      out = self.model.generate(input_ids=torch.tensor(ids, device=self.dev),
                                attention_mask=torch.tensor(mask, device=self.dev),
                                pixel_values=px, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=0)
    sync()
    assert out.shape[1] == width + new_tokens
    return time.perf_counter() - t

  def measure(self, clients: int, new_tokens: int, repeats: int) -> dict:
    pick = lambda n: [self.rows[i % len(self.rows)] for i in range(n)]
    self.generate(pick(1), new_tokens)                   # warm-up
    one = min(self.generate(pick(1), new_tokens) for _ in range(repeats))
    self.generate(pick(clients), new_tokens)
    batch = min(self.generate(pick(clients), new_tokens) for _ in range(repeats))
    return {"loop_req_s": 1 / one, "loop_tok_s": new_tokens / one,
            "batch_req_s": clients / batch, "batch_tok_s": clients * new_tokens / batch}


# --- driver --------------------------------------------------------------------------------------

def _tiny(tmp: str):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests.tiny_ckpt import llava_checkpoint
  ckpt = llava_checkpoint(tmp)
  return ckpt, os.path.join(tmp, "hf_llava")


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", help="our checkpoint (default: the tiny test Llava, built here)")
  p.add_argument("--hf", help="the same model as a HF Llava dir (default: the tiny one's)")
  p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
  p.add_argument("--requests-per-client", type=int, default=4)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--max-batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3, help="HF timings: best of N")
  p.add_argument("--no-hf", action="store_true", help="our server only")
  args = p.parse_args(argv)
  if bool(args.ckpt) != bool(args.hf) and not args.no_hf:
    p.error("give --ckpt and --hf together (or --no-hf)")
  import convert  # noqa: F401  (HF dirs)
  from serve.generate import Generator
  from serve.sampling import SamplingParams
  from serve.prompt import build_prompt
  from serve.server import Background, create_app
  tmp = tempfile.mkdtemp(prefix="bench_serve_")
  ckpt, hf_dir = (args.ckpt, args.hf) if args.ckpt else _tiny(tmp)
  gen = Generator.from_checkpoint(ckpt)
  images = [_image(s) for s in range(8)]
  uris = [_data_uri(im) for im in images]
  prompts = [build_prompt(gen.config, gen.tokenizer, QUESTION, [im]) for im in images]
  # The engine compiles every program it runs at start: no compile lands in a measurement.
  engine = gen.engine(gen.context_layout(args.max_batch), max_queue=max(args.clients) * 2)
  engine.warmup()
  srv = Background(create_app(engine, model_name="bench",
                              defaults=SamplingParams(max_tokens=args.new_tokens)))
  hf = None if args.no_hf else HFLoop(hf_dir, prompts, gen.config)
  results = []
  try:
    for c in args.clients:
      run_server(srv.url, c, 1, args.new_tokens, uris)      # warm the HTTP path
      r = {"clients": c, **run_server(srv.url, c, args.requests_per_client, args.new_tokens, uris)}
      if hf is not None:
        r.update(hf.measure(c, args.new_tokens, args.repeats))
      results.append(r)
      print(json.dumps(r), file=sys.stderr, flush=True)
  finally:
    srv.close()
  print(table(args, results))


def table(args, rows) -> str:
  lines = ["## Serving benchmark", "",
           f"- device: {device()}",
           f"- versions: {versions('jax', 'jaxlib', 'torch', 'transformers', 'fastapi', 'uvicorn')}",
           f"- date: {datetime.date.today().isoformat()}",
           f"- command: `{' '.join(['python -m bench.serve'] + sys.argv[1:])}`",
           f"- model: {args.ckpt or 'tiny test Llava (tests/tiny_ckpt.py)'}; image + question, "
           f"{args.new_tokens} new tokens per request (ignore_eos), greedy; "
           f"{args.requests_per_client} requests per client, closed loop", "",
           "| clients | ours req/s | ours tok/s | ours mean latency s | HF loop req/s | "
           "HF loop tok/s | HF static batch req/s | HF static batch tok/s | ours vs HF loop |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    hf = [f"{r[k]:.2f}" if k in r else "-"
          for k in ("loop_req_s", "loop_tok_s", "batch_req_s", "batch_tok_s")]
    rel = f"{r['req_s'] / r['loop_req_s']:.1f}x" if "loop_req_s" in r else "-"
    lines.append(f"| {r['clients']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['latency_s']:.3f} | "
                 + " | ".join(hf) + f" | {rel} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
