"""Defaults shared by every training config; each config file's get_config() starts from `base()`.

Fields (override any on the command line: `--config.optim.lr=1e-5`; in a chained config such as
configs/demo.py prefix the stage: `--config.stage2.optim.lr=1e-5`; `python -m train.main --config
FILE --help` lists them with their values):
  name                  run name (default workdir: runs/<name>)
  model.init            where the weights come from: a checkpoint dir of this project (or a stage-1
                        workdir, meaning its final/), a HF dir, "preset:NAME" (random init) or
                        "scratch" (random init of model.arch; vocab_size 0 / image_token_id -1 are
                        taken from the tokenizer)
  model.preset          the architecture the recipe expects; used to plan a run (shapes, memory)
                        when model.init is not on this machine
  model.lora            rank > 0 adds adapters (rank, alpha, dropout, targets, vision_targets)
  model.dtype           compute dtype; trainable weights always keep float32 masters
  model.frozen_dtype    storage dtype of frozen weights ("" keeps the stored dtype)
  model.remat / model.attention   vlm.config.Runtime.remat / .attention
  model.vision_remat    the vision tower's own remat policy (Runtime.vision_remat; the same
                        names as model.remat): costs nothing while the tower is frozen
  model.loss_chunk      positions per vocabulary projection in the loss (0: all at once)
  trainable             regexes over '/'-joined parameter paths; everything else is frozen
  data.*                data.pipeline.DataConfig fields; None means the DataConfig / model default
                        (template, image_position, system, image geometry and placeholder counts
                        come from the model, data.image.ImageGeometry.of; data.resize_mode
                        overrides the geometry's; num_epochs from train.epochs, or endless when
                        train.steps is set). The final checkpoint records the prompt format the
                        data was rendered in (template, image_position, system; not for `plain`).
                        strict (bad samples are errors) or lenient (skipped and counted), with
                        lenient's skip guard: max_skipped_fraction (abort when more of the samples
                        read were bad; default 0.01, 1.0: never), skip_check_after (samples read
                        before that fraction counts; 200), max_leading_skips (abort when the first
                        N samples are all bad; 20, 0: off)
  eval.*                held-out loss: paths (empty: none), every (steps), batches (0: all)
  optim.*               lr, groups ({name: {pattern, lr}} per-group rates), schedule (cosine |
                        linear | constant), warmup_ratio, min_lr_ratio, weight_decay, no_decay
                        (patterns exempt from decay), b1, b2, eps, clip_norm (0: none), grad_accum
                        (micro-batches per optimizer step: the memory knob; the global batch is
                        data.global_batch)
  train.*               epochs, steps (0: epochs x samples / global batch), seed, max_nonfinite
                        (abort after that many non-finite steps in a row), log_every, peak_tflops
                        (per device, for MFU where the device is not known), prng_impl (the
                        dropout key: threefry2x32 | rbg), allow_incomplete (False: a run the data
                        cannot carry to its planned steps writes no final/ and exits non-zero;
                        True: it writes final/ from the steps it made)
  mesh.*                shape (data, fsdp, tensor; -1 takes the remaining devices), num_devices
                        (0: all)
  sharding_rules        (logical axis, mesh axes) pairs placing weights and activations
                        (vlm/sharding.py: the names, DEFAULT_RULES); e.g. shard the sequence with
                        ("activation_length", "tensor") in place of its None
  checkpoint.*          every (steps), keep, use_async, sync_every (steps between multi-host
                        preemption checks)
Every field's allowed values are in RULES below (`--help` shows them); train.main, train.validate
and train.aot check a run's whole config against it (train/preflight.py) before any data or
weights are read.
A chained config (configs/demo.py) instead holds `chain` (stage names, run in order, each in
WORKDIR/<name>), one such config per stage, and optionally `prepare` ("module:function" called with
WORKDIR first). "{workdir}" in any string stands for WORKDIR.
"""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from configs.rules import (INTEGER, Directory, Files, Kind, OneOf, Regexes, SubsetOf, Where, above,
                           All, at_least, between, optional)
from data.conversation import IMAGE_POSITIONS, TEMPLATES
from data.pipeline import DataConfig
from vlm.attention import IMPLS
from vlm.config import LLM_PROJECTIONS, PRESETS, VISION_PROJECTIONS, LoraConfig
from vlm.families.module import REMAT_POLICIES
from vlm.sharding import AXES, DEFAULT_RULES


# DataConfig fields a config leaves unset (None) by default: the model's value (template, system,
# image_position, the geometry's resize_mode) or one derived at run time; typed placeholders, so
# that the command line can set them.
UNSET = dict(image_root=str, template=str, tokenizer_dir=str, per_process_batch=int,
             pad_buckets=tuple, pack_bins=int, num_epochs=int, resize_mode=str,
             max_images_per_row=int, system=str, image_position=str, cache_dir=str,
             tfds_data_dir=str)


def data_defaults() -> dict:
  """data.pipeline.DataConfig fields a config may set, at DataConfig's defaults or UNSET; of the
  image geometry (the model's) only resize_mode, and never the model's image_token_id."""
  out = {}
  for f in dataclasses.fields(DataConfig):
    name = "resize_mode" if f.name == "geometry" else f.name
    if name != "image_token_id":
      out[name] = placeholder(UNSET[name]) if name in UNSET else f.default
  return out


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.model = dict(
      init="", preset="", arch=None, seed=0,
      lora=dataclasses.asdict(LoraConfig()),
      dtype="bfloat16", frozen_dtype="bfloat16", remat="full", vision_remat="full",
      attention="auto", loss_chunk=0)
  c.trainable = (r"^connector/",)
  c.data = data_defaults()
  c.eval = dict(paths=(), every=0, batches=0, global_batch=0)
  # Not stated in the papers (LLaVA runs HF Trainer defaults): betas, eps, clipping, no_decay.
  c.optim = dict(lr=1e-3, groups={}, schedule="cosine", warmup_ratio=0.03, min_lr_ratio=0.0,
                 weight_decay=0.0, no_decay=(r"bias$", r"norm", r"(^|/)ln", r"scale$"),
                 b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, grad_accum=1)
  c.train = dict(epochs=1, steps=0, seed=0, max_nonfinite=10, log_every=10, peak_tflops=0.0,
                 prng_impl="threefry2x32",  # dropout key: threefry2x32 | rbg (train/plan.py)
                 allow_incomplete=False)
  c.mesh = dict(shape=(1, -1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.checkpoint = dict(every=500, keep=3, use_async=True, sync_every=10)
  return c


DTYPES = ("float32", "bfloat16", "float16")
REMAT = OneOf(*REMAT_POLICIES)
BOOL = Kind(bool, "True or False")
TEXT = Kind(str, "a string")


def _divides(field: str):
  return lambda v, c: None if not isinstance(c[field], int) or c[field] < 1 else v % c[field] == 0


def _groups(v, c) -> bool:
  ok = lambda g: (Regexes().breach((g.get("pattern"),), c) is None and
                  above(0).allows(g.get("lr"), c))
  return hasattr(v, "values") and all(hasattr(g, "get") and ok(g) for g in v.values())


def _axes_rules(v, c) -> bool:
  axes = lambda a: a if isinstance(a, (tuple, list)) else (a,)
  return all(isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
             and set(axes(r[1])) <= set(AXES) | {None} for r in v)


_BATCH_DEVICES = Where("divisible by the mesh's data x fsdp devices",
                       lambda v, c: None if c.batch_devices is None or not isinstance(v, int)
                       else v % c.batch_devices == 0, detail=lambda c: c.batch_devices)

# Every field of base() and what it allows; train/preflight.py checks a config against this table
# (each breach one line naming the field, its value and this range) and `--help` shows it.
RULES = {
    "name": Where("a non-empty string", lambda v, c: isinstance(v, str) and bool(v)),
    "model.init": Where("a checkpoint dir, a training workdir, a HF dir, 'preset:NAME' or "
                        "'scratch'", lambda v, c: c.init_problem(v), path=True),
    "model.preset": OneOf("", *PRESETS),
    "model.arch": Where("the network's fields (vlm.config.VLMConfig) when model.init is 'scratch'",
                        lambda v, c: c["model.init"] != "scratch" or bool(v)),
    "model.seed": INTEGER,
    "model.lora.rank": at_least(0, "0: no adapters"),
    "model.lora.alpha": above(0),
    "model.lora.dropout": between(0, 1, hi_open=True),
    "model.lora.targets": SubsetOf(LLM_PROJECTIONS),
    "model.lora.vision_targets": SubsetOf(VISION_PROJECTIONS),
    "model.dtype": OneOf(*DTYPES),
    "model.frozen_dtype": OneOf("", *DTYPES),
    "model.remat": REMAT,
    "model.vision_remat": REMAT,
    "model.attention": OneOf(*IMPLS),
    "model.loss_chunk": at_least(0, "0: all positions at once"),
    "trainable": Regexes(nonempty=True),
    "data.paths": Files(nonempty=True),
    "data.image_root": optional(Directory()),
    "data.template": optional(OneOf(*TEMPLATES)),
    "data.tokenizer_dir": optional(Directory()),
    "data.max_len": All(at_least(1), Where(
        "more than the tokens of one image", lambda v, c: None if c.image_tokens is None
        or not isinstance(v, int) else v > c.image_tokens,
        detail=lambda c: f"the model's: {c.image_tokens}")),
    "data.global_batch": All(at_least(1), Where("divisible by optim.grad_accum",
                                                _divides("optim.grad_accum")), _BATCH_DEVICES),
    "data.per_process_batch": optional(at_least(1)),
    "data.mode": OneOf("pad", "pack"),
    "data.pad_buckets": optional(Where(
        "row lengths in [1, data.max_len] (empty: quarters of max_len)",
        lambda v, c: all(isinstance(b, int) and 1 <= b <= c["data.max_len"] for b in v))),
    "data.group_window": at_least(1),
    "data.pack_bins": optional(at_least(1)),
    "data.seed": INTEGER,
    "data.shuffle": BOOL,
    "data.num_epochs": optional(at_least(1)),
    "data.worker_count": at_least(0, "0: decode in this process"),
    "data.worker_buffer_size": at_least(1),
    "data.read_threads": at_least(0),
    "data.read_buffer": at_least(0),
    "data.strict": BOOL,
    "data.resize_mode": optional(OneOf("squash", "center_crop", "pad")),
    "data.max_images_per_row": optional(at_least(0, "0: text only")),
    "data.system": optional(TEXT),
    "data.image_position": optional(OneOf(*IMAGE_POSITIONS)),
    "data.cache_dir": optional(Directory(writable=True)),
    "data.tfds_data_dir": optional(Directory()),
    "data.log_skips": at_least(0),
    "data.max_skipped_fraction": between(0, 1, note="1: never stop"),
    "data.skip_check_after": at_least(0),
    "data.max_leading_skips": at_least(0, "0: off"),
    "eval.paths": Files(nonempty=False),
    "eval.every": at_least(0, "0: only at the end"),
    "eval.batches": at_least(0, "0: all"),
    "eval.global_batch": All(at_least(0, "0: data.global_batch"), Where(
        "0 or divisible by the mesh's data x fsdp devices",
        lambda v, c: v == 0 or _BATCH_DEVICES.fn(v, c), detail=lambda c: c.batch_devices)),
    "optim.lr": above(0),
    "optim.groups": Where("{name: {pattern: a regular expression, lr: > 0}}", _groups),
    "optim.schedule": OneOf("cosine", "linear", "constant"),
    "optim.warmup_ratio": between(0, 1),
    "optim.min_lr_ratio": between(0, 1),
    "optim.weight_decay": at_least(0, integer=False),
    "optim.no_decay": Regexes(),
    "optim.b1": between(0, 1, hi_open=True),
    "optim.b2": between(0, 1, hi_open=True),
    "optim.eps": at_least(0, integer=False),
    "optim.clip_norm": at_least(0, "0: no clipping", integer=False),
    "optim.grad_accum": at_least(1),
    "train.epochs": above(0),
    "train.steps": at_least(0, "0: as many as train.epochs take"),
    "train.seed": INTEGER,
    "train.max_nonfinite": at_least(1),
    "train.log_every": at_least(1),
    "train.peak_tflops": at_least(0, "0: the device's own", integer=False),
    "train.prng_impl": OneOf("threefry2x32", "rbg"),
    "train.allow_incomplete": BOOL,
    "mesh.shape": Where("(data, fsdp, tensor) sizes >= 1, one of them may be -1 (the rest), "
                        "multiplying to the devices used",
                        lambda v, c: c.devices is None or c.batch_devices is not None,
                        detail=lambda c: f"{c.devices} devices"),
    "mesh.num_devices": Where("0 (all) or at most the devices there are",
                              lambda v, c: isinstance(v, int) and not isinstance(v, bool) and (
                                  0 <= v if c.available is None else 0 <= v <= c.available),
                              detail=lambda c: f"{c.available}"),
    "sharding_rules": Where(f"(logical axis, mesh axes) pairs over {' | '.join(AXES)}",
                            _axes_rules),
    "checkpoint.every": at_least(1),
    "checkpoint.keep": at_least(0, "0: all"),
    "checkpoint.use_async": BOOL,
    "checkpoint.sync_every": at_least(1),
}


def lora(c: ml_collections.ConfigDict, *, rank: int, alpha: float, dropout: float,
         vision: bool = False) -> None:
  """LoRA on every decoder projection (LLaVA's find_all_linear_names), optionally on the tower's;
  only the adapters and the connector train."""
  c.model.lora.rank, c.model.lora.alpha, c.model.lora.dropout = rank, alpha, dropout
  c.model.lora.vision_targets = VISION_PROJECTIONS if vision else ()
  c.trainable = (r"/lora_[ab]$", r"^connector/")
