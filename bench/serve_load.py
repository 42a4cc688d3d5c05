"""The serving benchmark's workload and its arithmetic: a mixed request list, Poisson arrival
times, closed-loop and open-loop drivers over an OpenAI-compatible HTTP server (streamed, so the
time to the first token and the gaps between tokens are seen as a client sees them), and the
summary figures (req/s, output tok/s, TTFT and ITL percentiles).

Every request is greedy with `ignore_eos` (vLLM's extension, which both the engine and the
arrival-batching baseline honour), so its answer is exactly its max_tokens long on every system
and the systems do the same work.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Optional, Sequence

import numpy as np

WORDS = ("the chest x-ray shows a small nodule in the left lung with no pleural effusion and a "
         "normal heart size the liver is enlarged there is a fracture of the rib").split()


@dataclasses.dataclass
class Request:
  question: str
  image: Optional[str]          # a data: URI, or None (text only)
  max_tokens: int


@dataclasses.dataclass
class Timing:
  """One request as its client saw it: seconds from send to each content chunk, and the
  answer's token count (usage)."""
  sent: float
  chunks: list
  tokens: int = 0


def workload(n: int, seed: int, image_uris: Sequence[str], *, words=(4, 160),
             max_tokens=(8, 256), images: bool = True) -> list:
  """n requests: questions of `words` words (log-uniform, so short and long prompts mix), every
  other one with an image (when `images`), max_tokens uniform in the closed range."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    k = int(np.exp(rng.uniform(np.log(words[0]), np.log(words[1] + 1))))
    q = " ".join(rng.choice(WORDS, size=k)) + "?"
    img = image_uris[i % len(image_uris)] if images and i % 2 == 0 else None
    out.append(Request(q, img, int(rng.integers(max_tokens[0], max_tokens[1] + 1))))
  return out


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
  """Send times (s from the start) of n requests arriving as a Poisson process of `rate`/s:
  exponential gaps of mean 1/rate, the first at 0."""
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
  return np.concatenate([[0.0], np.cumsum(gaps[1:])])


def summary(timings: Sequence[Timing], elapsed: float) -> dict:
  """req/s and output tok/s over the wall time; TTFT (send -> first content) and ITL (gaps
  between successive content chunks of one stream) p50 / p99 in ms."""
  ttft = [t.chunks[0] for t in timings if t.chunks]
  itl = [b - a for t in timings for a, b in zip(t.chunks, t.chunks[1:])]
  pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")
  return {"requests": len(timings), "elapsed_s": elapsed, "req_s": len(timings) / elapsed,
          "tok_s": sum(t.tokens for t in timings) / elapsed,
          "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
          "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


def body(req: Request, model: str) -> dict:
  content = ([{"type": "image_url", "image_url": {"url": req.image}}] if req.image else []) + [
      {"type": "text", "text": req.question}]
  return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
          "max_tokens": req.max_tokens, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}


async def _one(client, url: str, model: str, req: Request, t0: float) -> Timing:
  timing = Timing(sent=time.perf_counter() - t0, chunks=[])
  async with client.stream("POST", url + "/v1/chat/completions", json=body(req, model)) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[6:])
      if "error" in event:
        raise RuntimeError(event["error"]["message"])
      if event.get("usage"):
        timing.tokens = event["usage"]["completion_tokens"]
      for c in event.get("choices", ()):
        if c["delta"].get("content"):
          timing.chunks.append(time.perf_counter() - t0 - timing.sent)
  if timing.tokens != req.max_tokens:
    raise RuntimeError(f"{timing.tokens} tokens returned, {req.max_tokens} asked (ignore_eos)")
  return timing


async def _drive(url, model, requests, *, clients=None, arrivals=None) -> tuple:
  import httpx
  limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
  async with httpx.AsyncClient(timeout=3600, limits=limits, trust_env=False) as client:
    t0 = time.perf_counter()
    if clients:   # closed loop: each client sends its next request when its last one ends
      queue = list(reversed(requests))
      out = []

      async def worker():
        while queue:
          out.append(await _one(client, url, model, queue.pop(), t0))
      await asyncio.gather(*(worker() for _ in range(clients)))
    else:         # open loop: each request at its arrival time, whatever is still running

      async def at(t, req):
        await asyncio.sleep(max(0.0, t - (time.perf_counter() - t0)))
        return await _one(client, url, model, req, t0)
      out = await asyncio.gather(*(at(t, r) for t, r in zip(arrivals, requests)))
    return list(out), time.perf_counter() - t0


def closed_loop(url: str, model: str, requests: list, clients: int) -> dict:
  timings, elapsed = asyncio.run(_drive(url, model, requests, clients=clients))
  return summary(timings, elapsed)


def open_loop(url: str, model: str, requests: list, rate: float, seed: int) -> dict:
  arrivals = poisson_arrivals(len(requests), rate, seed)
  timings, elapsed = asyncio.run(_drive(url, model, requests, arrivals=arrivals))
  return summary(timings, elapsed)
