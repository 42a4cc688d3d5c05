"""The training-step benchmark's cases (bench.train_step): their networks, the batch both sides
train on, the FLOPs of one step, and the timing loop both sides share."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

CASES = {"lora": "(a) stage-2 LoRA step", "llm": "(b) LLM alone, LoRA",
         "stage1": "(c) stage-1 step (connector)", "vision": "(d) S2 tower alone (frozen)"}
SIDES = ("ours", "reference")
SMOKE_ARCH = dict(
    llm=dict(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128,
             rope_theta=500000.0, max_positions=128),
    vision=dict(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_dim=64),
    tiler=dict(kind="s2", scales=(28, 56, 84)), image_token_id=255, template="llama3")
SMOKE_FLAGS = dict(micro_batch=2, seq=32, steps=1, warmup=1, lora_rank=8, lora_alpha=16.0,
                   dtype="float32", loss_chunk=8)


# --- shapes, batches, FLOPs ----------------------------------------------------------------------

def arch(args, case):
  """The network of a case (vlm.config.VLMConfig, before LoRA)."""
  from vlm.config import VLMConfig, preset
  cfg = VLMConfig.from_dict(SMOKE_ARCH) if args.smoke else preset(args.preset)
  if case == "llm":
    cfg = cfg.replace(vision=None)
  if getattr(args, "layers", 0):
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, layers=args.layers))
  return cfg


def batch(args, cfg, case) -> dict:
  """Host arrays shared by both sides: ids, labels (-100 on BOS and image slots, as LLaVA masks
  them), uint8 pixels at the largest S2 scale."""
  from data.conversation import IGNORE
  rng = np.random.default_rng(0)
  b, s = args.micro_batch, args.seq
  img = cfg.image_token_id
  out = {}
  if case != "llm" and cfg.vision is not None:
    side = cfg.tiler.input_size(cfg.vision)
    out["pixel_values"] = rng.integers(0, 256, (b, 1, side, side, 3), dtype=np.uint8)
  if case == "vision":
    return out
  ids = rng.integers(0, min(img if img > 0 else cfg.llm.vocab_size, cfg.llm.vocab_size),
                     (b, s)).astype(np.int32)
  start = 1
  if case != "llm":
    f = cfg.image_tokens()
    if s < 1 + f + 2:
      raise ValueError(f"--seq {s} leaves no text after BOS + {f} image positions")
    ids[:, 1:1 + f] = img
    start = 1 + f
  labels = ids.copy()
  labels[:, :start] = IGNORE
  out.update(input_ids=ids, labels=labels)
  return out


def _llm_params(cfg, rank) -> int:
  c = cfg.llm
  q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
  shapes = {"q": (c.hidden, q), "k": (c.hidden, kv), "v": (c.hidden, kv), "o": (q, c.hidden),
            "gate": (c.hidden, c.mlp_dim), "up": (c.hidden, c.mlp_dim),
            "down": (c.mlp_dim, c.hidden)}
  per = sum(i * o + (rank * (i + o) if t in cfg.lora.targets else 0)
            for t, (i, o) in shapes.items())
  return c.layers * per + c.vocab_size * c.hidden


def _vit_params(cfg) -> int:
  v = cfg.vision
  return v.layers_used * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim)


def work(args, cfg, case) -> dict:
  """Tokens, images and model FLOPs of one step (see the module docstring)."""
  b, s = args.micro_batch, args.seq
  images = 0 if case == "llm" else b
  tokens = 0 if case == "vision" else b * s
  flops = 6 * _llm_params(cfg, args.lora_rank if case in ("lora", "llm") else 0) * tokens
  if images:
    v = cfg.vision
    tiles = (sum((sc // v.image_size) ** 2 for sc in cfg.tiler.scales)
             if cfg.tiler.kind == "s2" else 1)
    patch = 2 * v.grid ** 2 * 3 * v.patch_size ** 2 * v.width
    per_tile = 2 * (v.grid ** 2 + 1) * _vit_params(cfg) + patch
    flops += images * tiles * per_tile
    if case != "vision":
      conn = cfg.feature_dim * cfg.llm.hidden + cfg.llm.hidden ** 2
      flops += 6 * conn * images * cfg.image_tokens()
  return {"tokens": tokens, "images": images, "flops": flops}


def timed(step, carry, warmup, steps, sync):
  """(seconds of the first call (compile + run), mean seconds of `steps` calls after warm-up)."""
  t = time.perf_counter()
  carry = step(carry)
  sync(carry)
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    carry = step(carry)
  sync(carry)
  t = time.perf_counter()
  for _ in range(steps):
    carry = step(carry)
  sync(carry)
  return first, (time.perf_counter() - t) / steps, carry


def error(e: BaseException) -> str:
  """An exception as a one-line table note: its type and the first line of its message."""
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
