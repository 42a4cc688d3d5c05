"""Training-step speed on one GPU: this project's jitted train step vs the PyTorch LLaVA stack.

On one H100 (each case and side in its own process; roughly 8-10 minutes for all four cases, so
a short device session may run two calls: `--cases llm vision`, then `--cases lora stage1`):

  python -m bench.train_step --cases lora llm stage1 vision --steps 5 --warmup 2

  python -m bench.train_step --smoke          # tiny shapes on CPU, both sides: checks the script
  python -m bench.train_step --cases llm --side ours --layers 4 \
      --ablate base remat=none loss_chunk=0 attention=xla frozen_dtype=float32   # ablations
  python -m bench.train_step --cases llm --profile /tmp/prof   # + a kernel summary of our step

Cases, all on the Llama3-Med shape (`vlm.preset("llama3_med")`: S2 DFN5B ViT-H/14-378 at
378/756/1134 = 14 tiles per image, mlp2x_gelu connector, Llama-3-8B), micro-batch 8, sequence
2048, one image per row (BOS, 729 image positions, text):
  lora    (a) stage-2 LoRA step: tower frozen, connector + LoRA r=128 alpha=256 on
              q,k,v,o,gate,up,down train
  llm     (b) the LLM alone with the same LoRA (text only)
  stage1  (c) stage-1 step: only the connector trains, gradients flow through the frozen LLM
  vision  (d) the frozen S2 tower alone (forward, images/s)

Ours is train.step.make_train_step as train.main builds it (train.state.plan: trainable float32
masters + AdamW state, frozen weights bf16, loss over trained tokens, vocabulary-chunked loss,
remat / attention from the flags), on random weights made on the device and a device-resident
batch. The reference is what the papers' code runs: HF LlamaForCausalLM (+ peft LoRA) and
CLIPVisionModel, SDPA, non-reentrant gradient checkpointing, bf16 frozen weights with float32
trainable weights under torch.autocast(bfloat16), torch AdamW + grad-norm clipping; the tower runs
under no_grad with LLaVA's S2 wrapper (one tower call per scale, hidden_states[select_layer]).

FLOPs (the same count for both sides, so TFLOP/s ratio = speed ratio): 6 N per LLM token, N = the
decoder's matmul parameters incl. LoRA adapters + the LM head (embedding lookup and attention scores
not counted; frozen weights need no weight gradient, the 6N convention counts it anyway);
6 N_connector per image feature; 2 N_vit per tower token for the frozen tower forward, N_vit = the
layers that run up to select_layer + patch embedding, 730 tokens x 14 tiles per image.
MFU = TFLOP/s / --peak-tflops (989: H100 SXM bf16 dense). Peak memory is the process's peak device
allocation (JAX memory_stats / torch.cuda.max_memory_allocated), init included. Our step is compiled
ahead of time, so its compile seconds and XLA's memory analysis are reported beside the timing.

Ablations (`--ablate`, ours only): each VARIANT (`base`, or `key=value[,key=value]` over remat,
attention, loss_chunk, frozen_dtype) is its own compiled step in one process, all compiled
first (`--compile-threads` at once) and then timed one after another on the same weights and
batch; memory per variant is XLA's compiled memory analysis, since the process peak spans them
all. `--layers N` runs them at reduced depth (same widths) so that many fit in a short session.
`--profile DIR` traces 2 more steps of ours after the timing (bench/profile.py) and adds the kernel
summary to the result.

XLA flag A/B (`--xla-flags SET ...`, ours only, first case): each named set of bench/xla_flags.py
(or NAME=--xla_flag=value ...) runs the step in its own process with those XLA_FLAGS, a row each
against the first set:

  python -m bench.train_step --cases llm --side ours --layers 4 \
      --xla-flags base dynamic_slice_fusion cublas_gemms latency_hiding
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench import xla_flags
from bench.env import device, versions

CASES = {"lora": "(a) stage-2 LoRA step", "llm": "(b) LLM alone, LoRA",
         "stage1": "(c) stage-1 step (connector)", "vision": "(d) S2 tower alone (frozen)"}
SIDES = ("ours", "reference")
HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"}
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
  labels[:, :start] = -100
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


# --- ours ----------------------------------------------------------------------------------------

def _train_config(args, case, cfg, total):
  from configs import common
  c = common.base()
  arch_dict = cfg.to_dict()
  c.model.update(init="scratch", arch=arch_dict, dtype=args.dtype,
                 frozen_dtype=getattr(args, "frozen_dtype", None) or args.dtype,
                 remat=args.remat, attention=args.attention, loss_chunk=args.loss_chunk)
  if case in ("lora", "llm"):
    common.lora(c, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
  else:
    c.trainable = (r"^connector/",)
  c.optim.update(lr=2e-4, warmup_ratio=0.0, grad_accum=1)
  c.mesh.update(shape=(1, 1, 1), num_devices=1)
  c.train.update(steps=total, prng_impl=getattr(args, "prng_impl", "threefry2x32"))
  return c


def _random(abstract, seed):
  """Weights in each leaf's dtype and sharding, made on the device (bench/weights.py)."""
  from bench.weights import hash_fill
  return hash_fill(abstract, seed)


def _peak_jax():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _timed(step, carry, warmup, steps, sync):
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


@dataclasses.dataclass
class _Prepared:
  """Our step before any weights exist: a jitted fn, its abstract arguments, and how to make the
  real ones (`make() -> args`). carry: the first argument is a train state, donated each step."""
  fn: object
  abstract: tuple
  make: object
  carry: bool


def _prepare(args, case) -> _Prepared:
  import jax
  import jax.numpy as jnp
  from train import state as state_lib
  from train.step import make_train_step
  from vlm import tiler
  from vlm.model import normalize_pixels
  from vlm.sharding import batch_shardings
  cfg = arch(args, case)
  total = args.warmup + args.steps
  c = _train_config(args, case, cfg, total)
  mesh = state_lib.mesh_for(c)
  p = state_lib.plan(c, mesh, total)
  state_abs, frozen_abs = state_lib.abstract_state(p)
  host = batch(args, cfg, case)
  sh = batch_shardings(mesh, host)
  batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in host.items()}
  put_batch = lambda: {k: jax.device_put(v, sh[k]) for k, v in host.items()}
  if case == "vision":
    v = p.config.vision
    dtype = jnp.dtype(args.dtype)

    def s2(m, px):
      x = normalize_pixels(px, v.mean, v.std).reshape((-1,) + px.shape[2:])
      return tiler.s2_features(lambda t: m.vision(t.astype(dtype), True), x, p.config.tiler.scales,
                               v.image_size, v.grid)
    fn = jax.jit(lambda prm, px: p.model.apply({"params": prm}, px, method=s2))
    tower = {"vision": frozen_abs["vision"]}
    return _Prepared(fn, (tower, batch_abs["pixel_values"]),
                     lambda: (_random(tower, 2), put_batch()["pixel_values"]), carry=False)

  def make():
    from bench.weights import random_train_state
    return (*random_train_state(p), put_batch())
  step = make_train_step(p.model, p.tx, mesh=mesh, state_shardings=p.state_shardings,
                         frozen_shardings=p.frozen_shardings, batch_shardings=sh,
                         loss_chunk=c.model.loss_chunk, rules=p.rules)
  return _Prepared(step, (state_abs, frozen_abs, batch_abs), make, carry=True)


def _compile(prep: _Prepared):
  """(compiled step, seconds to lower + compile it)."""
  t = time.perf_counter()
  compiled = prep.fn.lower(*prep.abstract).compile()
  return compiled, time.perf_counter() - t


def _memory(compiled) -> dict:
  """XLA's static memory analysis of a compiled step (bytes), where the backend gives one."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if m is None:
    return {}
  keys = {"compiled_args": "argument_size_in_bytes", "compiled_out": "output_size_in_bytes",
          "compiled_alias": "alias_size_in_bytes", "compiled_temp": "temp_size_in_bytes",
          "compiled_peak": "peak_memory_in_bytes"}
  return {k: int(getattr(m, a)) for k, a in keys.items() if getattr(m, a, None) is not None}


def _run_prepared(args, prep: _Prepared, compiled, compile_s) -> dict:
  """Time a compiled step; `_again` (popped by `measure`) runs one more step for the profiler."""
  import jax
  sync = jax.block_until_ready
  fixed = prep.make()
  metrics = {}
  if prep.carry:
    def one(st):
      st, m = compiled(st, *fixed[1:])
      metrics.update(m)
      return st
    first, dt, carry = _timed(one, fixed[0], args.warmup, args.steps, sync)
  else:
    one = lambda _: compiled(*fixed)
    first, dt, carry = _timed(one, None, args.warmup, args.steps, sync)
  box = [carry]

  def again():
    box[0] = one(box[0])
    return box[0]
  return {"first_s": compile_s + first, "compile_s": compile_s, "step_s": dt,
          "peak": _peak_jax(), "loss": float(metrics["loss"]) if metrics else None,
          **_memory(compiled), "device": device(), "_again": again}


def run_ours(args, case) -> dict:
  import jax
  if not args.smoke and jax.default_backend() != "gpu":
    raise RuntimeError("our side needs jax with a GPU (use --smoke on CPU)")
  prep = _prepare(args, case)
  return _run_prepared(args, prep, *_compile(prep))


def _profile(args, case, again, step_s) -> dict:
  """Kernel summary of 2 traced steps (bench/profile.py); a profiler failure becomes a note."""
  from bench import profile
  try:
    s = profile.trace_steps(again, 2, os.path.join(args.profile, case), step_s=step_s,
                            title=f"profile: {CASES[case]}, ours, {args.warmup + args.steps} "
                                  "steps in; 2 traced steps")
  except Exception as e:  # noqa: BLE001 - the timing stands without the profile
    return {"note": f"{type(e).__name__}: {str(e).strip()[:160]}"}
  return {k: s[k] for k in ("text", "busy_pct", "kernel_ms", "busy_ms", "step_ms",
                            "traced_step_ms", "categories", "trace")}


# --- ablations (ours) ----------------------------------------------------------------------------

ABLATION_KEYS = {"remat": ("none", "full", "save_dots", "save_attn_proj"),
                 "attention": ("auto", "xla", "cudnn", "pallas", "splash"),
                 "loss_chunk": int, "frozen_dtype": ("bfloat16", "float32"),
                 "lora_dropout": float, "prng_impl": ("threefry2x32", "rbg")}
# (a type: any value of it; a tuple: one of these)


def variant(text: str) -> dict:
  """'base' -> {}; 'remat=none,loss_chunk=0' -> {'remat': 'none', 'loss_chunk': 0}."""
  if text == "base":
    return {}
  out = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if key not in ABLATION_KEYS or not value:
      raise argparse.ArgumentTypeError(
          f"ablation {text!r}: want base or key=value with key in {sorted(ABLATION_KEYS)}")
    choices = ABLATION_KEYS[key]
    if isinstance(choices, type):
      out[key] = choices(value)
    elif value in choices:
      out[key] = value
    else:
      raise argparse.ArgumentTypeError(f"ablation {text!r}: {key} must be one of {choices}")
  return out


def _settings(args) -> dict:
  """The knobs an ablation varies, with 'auto' attention resolved for this backend."""
  import jax
  from vlm import attention
  att = args.attention
  if att == "auto" and hasattr(attention, "_auto"):
    att = attention._auto(jax.default_backend())
  return {"remat": args.remat, "attention": att, "loss_chunk": args.loss_chunk,
          "frozen_dtype": args.frozen_dtype or args.dtype, "lora_dropout": args.lora_dropout,
          "prng_impl": args.prng_impl}


def run_ablations(args, case, emit=print) -> list:
  """Each of args.ablate on our side, in one process: compile all (args.compile_threads at a
  time, so no compile overlaps a timing), then time them one after another. `emit` gets each
  result as soon as it is timed."""
  import jax
  if not args.smoke and jax.default_backend() != "gpu":
    raise RuntimeError("our side needs jax with a GPU (use --smoke on CPU)")
  base = work(args, arch(args, case), case)
  todo, seen, rows = [], {}, []
  for name in args.ablate:
    a = argparse.Namespace(**{**vars(args), **variant(name)})
    key = tuple(sorted(_settings(a).items()))
    row = {"case": case, "side": "ours", "variant": name, "settings": _settings(a), **base}
    rows.append(row)
    if key in seen:
      row["note"] = f"same settings as {seen[key]}"
      emit(row)
      continue
    seen[key] = name
    todo.append((row, a))
  preps, compiled = {}, {}

  def build(item):
    row, a = item
    preps[row["variant"]] = prep = _prepare(a, case)
    return _compile(prep)
  with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_threads)) as pool:
    futures = [(item, pool.submit(build, item)) for item in todo]
    for (row, _), fut in futures:
      try:
        compiled[row["variant"]] = fut.result()
      except Exception as e:  # noqa: BLE001 - a variant that does not compile is a table note
        row["note"] = _error(e)
  for row, a in todo:
    if row["variant"] in compiled:
      try:
        res = _run_prepared(a, preps.pop(row["variant"]), *compiled.pop(row["variant"]))
        res.pop("_again")
        res.pop("peak")   # the process peak spans every variant: see compiled_* instead
        row.update(res)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory without remat
        row["note"] = _error(e)
    emit(row)
  return rows


# --- reference (PyTorch) -------------------------------------------------------------------------

def _s2_torch(tower, x, scales, tile, grid, layer):
  """LLaVA's S2 wrapper: per scale, bicubic resize, cut tiles, one tower call, stitch, area-pool."""
  import einops
  import torch
  import torch.nn.functional as F
  outs = []
  for s in scales:
    xs = x if s == x.shape[-1] else F.interpolate(x.float(), size=(s, s), mode="bicubic",
                                                  align_corners=False).to(x.dtype)
    k = s // tile
    tiles = einops.rearrange(xs, "n c (i h) (j w) -> (n i j) c h w", i=k, j=k)
    h = tower(tiles, output_hidden_states=True).hidden_states[layer][:, 1:]
    f = einops.rearrange(h, "(n i j) (h w) c -> n c (i h) (j w)", i=k, j=k, h=grid)
    f = F.interpolate(f.float(), size=(grid, grid), mode="area").to(h.dtype)
    outs.append(einops.rearrange(f, "n c h w -> n (h w) c"))
  return torch.cat(outs, -1)


def run_reference(args, case) -> dict:
  import torch
  import transformers as T
  cfg = arch(args, case)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if not args.smoke and dev != "cuda":
    raise RuntimeError("the reference side needs torch with CUDA")
  low = torch.float32 if args.dtype == "float32" else torch.bfloat16
  torch.manual_seed(0)
  host = batch(args, cfg, case)
  tower = llm = connector = None
  default = torch.get_default_dtype()
  torch.set_default_dtype(low)   # frozen weights made straight in bf16
  try:
    with torch.device(dev):
      if cfg.vision is not None:
        v = cfg.vision
        tower = T.CLIPVisionModel(T.CLIPVisionConfig(
            image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
            intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
            hidden_act=v.act, layer_norm_eps=v.norm_eps, attn_implementation="sdpa")).eval()
        tower.requires_grad_(False)
      if case != "vision":
        L = cfg.llm
        llm = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=L.vocab_size, hidden_size=L.hidden, num_hidden_layers=L.layers,
            num_attention_heads=L.heads, num_key_value_heads=L.kv_heads, head_dim=L.head_dim,
            intermediate_size=L.mlp_dim, rms_norm_eps=L.norm_eps,
            max_position_embeddings=L.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": L.rope_theta},
            tie_word_embeddings=L.tie_embeddings, use_cache=False, attn_implementation="sdpa",
            pad_token_id=0, bos_token_id=None, eos_token_id=None))
        llm.requires_grad_(False)
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  finally:
    torch.set_default_dtype(default)
  params = []
  if case in ("lora", "llm"):
    import peft
    llm = peft.get_peft_model(llm, peft.LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=[HF_TARGETS[t] for t in cfg.lora.targets], task_type="CAUSAL_LM"))
    params += [p for p in llm.parameters() if p.requires_grad]
  if case in ("lora", "stage1"):
    h = cfg.llm.hidden
    connector = torch.nn.Sequential(torch.nn.Linear(cfg.feature_dim, h), torch.nn.GELU(),
                                    torch.nn.Linear(h, h)).to(dev)   # float32 trainable
    params += list(connector.parameters())
  if llm is not None:
    llm.train()
  to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev)
  pixels = None
  if "pixel_values" in host:
    v = cfg.vision
    mean, std = (torch.tensor(m, device=dev).view(1, 3, 1, 1) for m in (v.mean, v.std))
    px = to(host["pixel_values"][:, 0]).permute(0, 3, 1, 2).float() / 255.0
    pixels = ((px - mean) / std).to(low)   # what the HF image processor ships
  ids = to(host["input_ids"]).long() if "input_ids" in host else None
  labels = to(host["labels"]).long() if "labels" in host else None
  autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=low != torch.float32)
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  s2 = lambda: _s2_torch(tower, pixels, cfg.tiler.scales, cfg.vision.image_size,
                         cfg.vision.grid, cfg.vision.select_layer)
  if case == "vision":
    def fwd(_):
      with torch.no_grad(), autocast:
        return s2()
    first, dt, _ = _timed(fwd, None, args.warmup, args.steps, sync)
    return {"first_s": first, "step_s": dt, "peak": _peak_torch(dev), "loss": None}
  opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
  loss_box = []

  def step(_):
    with autocast:
      if case == "llm":
        loss = llm(input_ids=ids, labels=labels).loss
      else:
        with torch.no_grad():
          feats = s2()
        emb = llm.get_input_embeddings()(ids)
        feats = connector(feats.to(connector[0].weight.dtype))
        emb = emb.masked_scatter((ids == cfg.image_token_id)[..., None], feats.to(emb.dtype))
        loss = llm(inputs_embeds=emb, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss_box[:] = [loss.detach()]
  first, dt, _ = _timed(step, None, args.warmup, args.steps, sync)
  return {"first_s": first, "step_s": dt, "peak": _peak_torch(dev),
          "loss": float(loss_box[0].float())}


def _peak_torch(dev):
  import torch
  return torch.cuda.max_memory_allocated() if dev == "cuda" else None


# --- driver --------------------------------------------------------------------------------------

def measure(args, case, side, emit=None) -> dict:
  """One case on one side; a failure (OOM, missing CUDA) becomes a note. With --profile, ours is
  traced after the timing; `emit` gets the timed result first, so a profiler crash or hang
  cannot lose it."""
  r = {"case": case, "side": side}
  try:
    r.update(work(args, arch(args, case), case))
    r.update((run_ours if side == "ours" else run_reference)(args, case))
    again = r.pop("_again", None)
    if args.profile and again is not None:
      if emit:
        emit(r)
      r["profile"] = _profile(args, case, again, r["step_s"])
  except Exception as e:  # noqa: BLE001 - a failed case is a table note, not a crash
    r.pop("_again", None)
    r["note"] = _error(e)
  return r


def _error(e: BaseException) -> str:
  """An exception as a one-line table note: its type and the first line of its message."""
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def _last_json(text) -> dict | None:
  """The last stdout line that is a JSON object (a child may print an early result first)."""
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  for line in reversed((text or "").strip().splitlines()):
    try:
      obj = json.loads(line)
    except ValueError:
      continue
    if isinstance(obj, dict):
      return obj
  return None


def _child(args, argv, case, side, env=None) -> dict:
  """One case on one side in a fresh process: the frameworks never share device memory, and a
  peak is that case's alone. A result the child printed before it died or timed out is kept."""
  cmd = [sys.executable, "-m", "bench.train_step", *argv, "--cases", case, "--side", side,
         "--json"]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    out, err, ended = res.stdout, res.stderr, f"exit {res.returncode}"
  except subprocess.TimeoutExpired as e:
    res, out, err, ended = None, e.stdout, e.stderr, f"timed out after {args.timeout} s"
  r = _last_json(out)
  if res is not None and res.returncode == 0 and r is not None:
    return r
  if isinstance(err, bytes):
    err = err.decode(errors="replace")
  last = ((err or "").strip().splitlines() or ["?"])[-1][:120]
  if r is not None and "step_s" in r:
    r["note"] = (r.get("note", "") + f" {ended} after the timing: {last}").strip()
    return r
  return {"case": case, "side": side,
          "note": ended if res is None else f"{ended}: {last}"}


def _versions() -> str:
  return versions('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'peft')


def _head(title, args, rows, argv, settings, where=None) -> list:
  """The title ("{case}": the rows' case) and the device / versions / date / command / shape
  lines every table here starts with. The device is the one a child reported: the parent never
  starts a GPU backend (JAX would preallocate the memory the children need)."""
  where = where or next((r["device"] for r in rows if "device" in r), "?")
  title = title.format(case=CASES[rows[0]["case"] if rows else args.cases[0]])
  return [f"## {title} ({'smoke, CPU' if args.smoke else 'GPU'})", "", f"- device: {where}",
          f"- versions: {_versions()}", f"- date: {datetime.date.today().isoformat()}",
          f"- command: `{' '.join(['python -m bench.train_step'] + argv)}`",
          f"- shape: {_shape(args)}; {settings}"]


def table(args, rows, argv) -> str:
  lines = _head("Training-step benchmark", args, rows, argv,
                f"ours: remat {args.remat}, attention {args.attention}, loss chunk "
                f"{args.loss_chunk}, frozen weights {args.frozen_dtype or args.dtype}; LoRA "
                f"r={args.lora_rank} alpha={args.lora_alpha:g} dropout {args.lora_dropout:g}; "
                f"mean of {args.steps} steps after {args.warmup} warm-up; FLOPs: 6N per LLM "
                "token, 6N per connector feature, 2N per frozen tower token (module docstring); "
                f"MFU vs {args.peak_tflops:g} TFLOP/s", device() if args.smoke else None) + ["",
           "| case | side | step s | first step s | tokens/s | images/s | TFLOP/s | MFU | peak GB "
           "| loss | ours / reference | note |", "|---" * 12 + "|"]
  for r in rows:
    name = CASES[r["case"]]
    if "step_s" not in r:
      lines.append(f"| {name} | {r['side']} | - | - | - | - | - | - | - | - | - | "
                   f"{r.get('note', '')} |")
      continue
    dt = r["step_s"]
    tf = r["flops"] / dt / 1e12
    ratio = ""
    if r["side"] == "ours":
      ref = next((x for x in rows if x["case"] == r["case"] and x["side"] == "reference"
                  and "step_s" in x), None)
      ratio = f"{ref['step_s'] / dt:.2f}x" if ref else "-"
    fmt = lambda x, f: "-" if not x else format(x, f)
    lines.append(f"| {name} | {r['side']} | {dt:.4f} | {r['first_s']:.1f} | "
                 f"{fmt(r['tokens'] / dt, ',.0f')} | {fmt(r['images'] / dt, '.2f')} | {tf:.3g} | "
                 f"{100 * tf / args.peak_tflops:.1f}% | {_peak(r)} | {_loss(r)} | {ratio} | "
                 f"{r.get('note', '')} |")
  for r in rows:
    prof = r.get("profile")
    if prof:
      lines += ["", f"### Profile: {CASES[r['case']]}, {r['side']}", "", "```",
                prof.get("text") or prof.get("note", ""), "```"]
  return "\n".join(lines)


def _loss(r) -> str:
  return "-" if r.get("loss") is None else f"{r['loss']:.3f}"


def _peak(r) -> str:
  return f"{r['peak'] / 2 ** 30:.1f}" if r.get("peak") else "-"


def _against(r, base) -> list:
  """Cells compile s, step s, tokens/s and step time against `base` of one variant's row."""
  dt = r["step_s"]
  return [f"{r['compile_s']:.1f}", f"{dt:.4f}",
          f"{r['tokens'] / dt:,.0f}" if r.get("tokens") else "-", f"{dt / base['step_s']:.2f}x"]


def _shape(args) -> str:
  depth = f", {args.layers} decoder layers (reduced depth, same widths)" if args.layers else ""
  return (f"{'smoke' if args.smoke else args.preset}{depth}, micro-batch {args.micro_batch}, "
          f"sequence {args.seq}, {args.dtype}")


def ablation_table(args, rows, argv) -> str:
  """Markdown: one row per variant, step time against the base variant (the first row)."""
  lines = _head("Training-step ablations, {case}, ours", args, rows, argv,
                f"LoRA r={args.lora_rank} alpha={args.lora_alpha:g}; mean of {args.steps} steps "
                f"after {args.warmup} warm-up; every variant its own compiled step in one "
                f"process, all compiled before any was timed ({args.compile_threads} at a time), "
                "same weights and batch; memory is XLA's compiled memory analysis (arguments + "
                "temporaries; the process peak spans all variants)") + [
           "- at reduced depth the LM head and loss are a larger share of the step than with "
           "32 layers, so the loss-chunk effect is magnified and per-layer effects (remat, "
           "attention) are diluted", "",
           "| variant | remat | attention | loss chunk | frozen weights | compile s | step s "
           "| tokens/s | step time vs first row | args GB | temp GB | loss | note |",
           "|---" * 13 + "|"]
  base = next((r for r in rows if "step_s" in r), None)
  gb = lambda r, k: f"{r[k] / 2 ** 30:.3g}" if r.get(k) is not None else "-"
  for r in rows:
    st = r.get("settings", {})
    cells = [r["variant"], st.get("remat", "?"), st.get("attention", "?"),
             str(st.get("loss_chunk", "?")), st.get("frozen_dtype", "?")]
    if "step_s" in r:
      cells += _against(r, base) + [gb(r, "compiled_args"), gb(r, "compiled_temp"), _loss(r)]
    else:
      cells += ["-"] * 7
    lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
  return "\n".join(lines)


def run_xla_flags(args, argv, case, sets, emit=print) -> list:
  """Ours on `case` once per (name, XLA_FLAGS) of `sets`, each in its own process."""
  child_argv = _without(argv, "--xla-flags")
  rows = []
  for name, flags in sets:
    r = _child(args, child_argv, case, "ours", env=xla_flags.environ(flags))
    r.update(variant=name, xla_flags=flags)
    emit(r)
    rows.append(r)
  return rows


def _without(argv, option) -> list:
  """argv less `option` and the values after it."""
  out, dropping = [], False
  for a in argv:
    if a == option or a.startswith(option + "="):
      dropping = a == option
      continue
    if dropping and not a.startswith("-"):
      continue
    dropping = False
    out.append(a)
  return out


def xla_flags_table(args, rows, argv) -> str:
  """Markdown: one row per flag set, step time against the first set that ran."""
  lines = _head("XLA flag A/B, {case}, ours", args, rows, argv,
                f"remat {args.remat}, attention {args.attention}, loss chunk {args.loss_chunk}; "
                "each flag set in its own process with its own compile (JAX's compilation cache "
                f"keys on XLA_FLAGS); mean of {args.steps} steps after {args.warmup} warm-up; "
                "peak is the process's") + ["",
      "| flag set | XLA_FLAGS | compile s | step s | tokens/s | step time vs first row | peak GB "
      "| loss | note |", "|---" * 9 + "|"]
  base = next((r for r in rows if "step_s" in r), None)
  for r in rows:
    cells = [r["variant"], f"`{r['xla_flags']}`" if r["xla_flags"] else "(none)"]
    if "step_s" in r:
      cells += _against(r, base) + [_peak(r), _loss(r)]
    else:
      cells += ["-"] * 6
    lines.append("| " + " | ".join(cells + [r.get("note", "").replace("|", "/")]) + " |")
  return "\n".join(lines)


def parser():
  p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
  p.add_argument("--side", choices=("both",) + SIDES, default="both")
  p.add_argument("--steps", type=int, default=5, help="timed steps per case and side")
  p.add_argument("--warmup", type=int, default=2, help="steps before timing (the first compiles)")
  p.add_argument("--micro-batch", type=int, default=8, help="rows (= images) per step")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--preset", default="llama3_med")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype and frozen-weight storage (both sides)")
  p.add_argument("--remat", default="full", choices=("none", "full", "save_dots",
                                                     "save_attn_proj"), help="ours only")
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "pallas",
                                                         "splash"), help="ours only")
  p.add_argument("--loss-chunk", type=int, default=512,
                 help="positions per vocabulary projection in our loss (0: all at once)")
  p.add_argument("--lora-rank", type=int, default=128)
  p.add_argument("--lora-alpha", type=float, default=256.0)
  p.add_argument("--lora-dropout", type=float, default=0.05)
  p.add_argument("--prng-impl", default="threefry2x32", choices=("threefry2x32", "rbg"),
                 help="our dropout key's PRNG (train.prng_impl)")
  p.add_argument("--peak-tflops", type=float, default=989.0,
                 help="device peak for MFU (989: H100 SXM bf16 dense)")
  p.add_argument("--layers", type=int, default=0,
                 help="decoder layers (0: the preset's); fewer keeps the widths, cuts step time")
  p.add_argument("--frozen-dtype", default=None, choices=("bfloat16", "float32"),
                 help="storage of our frozen weights (default: --dtype); ours only")
  p.add_argument("--ablate", nargs="+", type=str, default=None, metavar="VARIANT",
                 help="ours only, first case: base or key=value[,key=value] over remat, "
                      "attention, loss_chunk, frozen_dtype; one process, a row each")
  p.add_argument("--xla-flags", nargs="+", default=None, metavar="SET",
                 help="ours only, first case: a process per XLA flag set (bench/xla_flags.py "
                      f"names: {', '.join(xla_flags.SETS)}; or NAME=--xla_flag=value ...)")
  p.add_argument("--compile-threads", type=int, default=1,
                 help="ablation variants compiled at once (all finish before any is timed)")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace 2 more steps of ours into DIR/<case> and summarize the kernels")
  p.add_argument("--timeout", type=int, default=400, help="seconds per case and side (GPU)")
  p.add_argument("--json", action="store_true", help="print one JSON result (child mode)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes on CPU, float32, 1 step, both sides in this process")
  return p


def parse_args(argv):
  p = parser()
  if p.parse_args(argv).smoke:   # tiny defaults in place of the parser's; given flags still win
    p.set_defaults(**SMOKE_FLAGS)
  return p.parse_args(argv)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  sides = SIDES if args.side == "both" else (args.side,)
  # each result as it comes: the JSON lines are the output (--json) or progress on stderr
  emit = ((lambda r: print(json.dumps(r), flush=True)) if args.json else
          (lambda r: print(json.dumps(r), file=sys.stderr, flush=True)))
  if args.xla_flags:
    try:   # a bad set fails before any work
      sets = [xla_flags.parse(spec) for spec in args.xla_flags]
    except ValueError as e:
      parser().error(str(e))
    rows = run_xla_flags(args, argv, args.cases[0], sets, emit)
    if not args.json:
      print(xla_flags_table(args, rows, argv))
    return
  if args.ablate:
    for text in args.ablate:   # fail on a bad variant before any work
      try:
        variant(text)
      except argparse.ArgumentTypeError as e:
        parser().error(str(e))
    try:
      rows = run_ablations(args, args.cases[0], emit)
    except Exception as e:  # noqa: BLE001 - e.g. no GPU: one note instead of a traceback
      rows = [{"case": args.cases[0], "side": "ours", "variant": "all",
               "note": _error(e)}]
      emit(rows[0])
    if not args.json:
      print(ablation_table(args, rows, argv))
    return
  if args.json:
    print(json.dumps(measure(args, args.cases[0], sides[0], emit)))
    return
  rows = []
  for case in args.cases:
    for side in sides:
      r = measure(args, case, side) if args.smoke else _child(args, argv, case, side)
      rows.append(r)
      emit(r)
  print(table(args, rows, argv))


if __name__ == "__main__":
  main()
