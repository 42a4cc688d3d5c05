"""Ablations of our step (bench.train_step --ablate): each variant its own compiled step in one
process, all compiled first, then timed one after another on the same weights and batch."""
from __future__ import annotations

import argparse
import concurrent.futures

from bench.step_cases import arch, error, work
from bench.step_ours import compile_step, prepare, run_prepared


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
    preps[row["variant"]] = prep = prepare(a, case)
    return compile_step(prep)
  with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_threads)) as pool:
    futures = [(item, pool.submit(build, item)) for item in todo]
    for (row, _), fut in futures:
      try:
        compiled[row["variant"]] = fut.result()
      except Exception as e:  # noqa: BLE001 - a variant that does not compile is a table note
        row["note"] = error(e)
  for row, a in todo:
    if row["variant"] in compiled:
      try:
        res = run_prepared(a, preps.pop(row["variant"]), *compiled.pop(row["variant"]))
        res.pop("_again")
        res.pop("peak")   # the process peak spans every variant: see compiled_* instead
        row.update(res)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory without remat
        row["note"] = error(e)
    emit(row)
  return rows
