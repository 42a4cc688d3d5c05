r"""Compile what train.main would run for an accelerator this machine does not have.

  python -m train.aot --config configs/stage2.py --target h100x8 [--config.FIELD=...] [--json]
  python -m train.aot --config configs/stage2.py --target v5p-8 --search [--apply]

The same config and overrides as train.main; the same plan, mesh (over the target's compile-only
devices), shardings, rules, remat and step, with `auto` attention resolved for the target (cuDNN on
GPUs, splash on TPUs). Programs: the train step, the held-out eval step, the S2 tower alone and the
serving engine's programs (encode, prefill chunks, insert, generate) at 1 and 16 slots. Per
program: per-device memory against the target's, FITS / DOES NOT FIT, compile seconds, FLOPs,
collectives, fused kernels and a roofline estimate (labelled as such). Exit status 1 when the train step does not
fit, 2 on a bad input.

--search compiles the train step over micro-batch per device and remat policy and prints the
cheapest remat with its largest micro-batch that leaves >= 8% of the device's memory free;
--apply prints the overrides to paste into train.main.

Needs the compile-only backends (`make aot-deps`: the CUDA plugin and libtpu, pinned in
requirements-aot.txt, installed into .aot/site, which only this command puts on sys.path).
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.environ.get("MEDVLM_AOT_SITE") or os.path.join(ROOT, ".aot", "site")


def installed() -> bool:
  return (os.path.isdir(os.path.join(SITE, "jax_plugins")) and
          os.path.isdir(os.path.join(SITE, "libtpu")))


def use_backends():
  """Put the compile-only backends on sys.path before JAX is imported (jaxlib looks for the CUDA
  plugin's version helpers at import); the host computes on its CPU, the CUDA plugin is loaded for
  its compiler only. Only `python -m train.aot` does this: no other process sees them."""
  if installed() and SITE not in sys.path:
    sys.path.insert(0, SITE)
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"   # no driver to check against


if __name__ == "__main__":
  use_backends()

from absl import app, flags  # noqa: E402

from data.errors import UserError, cli_errors  # noqa: E402
from train import main as train_main  # noqa: E402
from train.targets import TARGETS  # noqa: E402

PROGRAMS = ("train", "eval", "tower", "serve")
# cheapest recompute first
REMATS = ("none", "save_dots", "save_attn_proj", "full")

flags.DEFINE_enum("target", None, sorted(TARGETS), "Accelerator to compile for.")
flags.DEFINE_bool("json", False, "Print the report as one JSON object.")
flags.DEFINE_bool("search", False, "Search micro-batch per device x remat for the train step.")
flags.DEFINE_bool("apply", False, "With --search: print the train.main overrides it chose.")
flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile, of {PROGRAMS}.")
flags.DEFINE_string("stage", None, "A chained config: the stage to compile.")
FLAGS = flags.FLAGS


def target_devices(target):
  from jax.experimental import topologies
  if target.platform == "gpu":
    topo = topologies.get_topology_desc(target.name, "cuda", target_config=target.config_text(),
                                        topology=target.topology)
  else:
    topo = topologies.get_topology_desc(target.topology, "tpu")
  return list(topo.devices)


def _stage(config):
  if not config.get("chain"):
    return config
  if FLAGS.stage not in config.chain:
    raise UserError(f"a chained config: name one of its stages with --stage ({list(config.chain)})")
  return config[FLAGS.stage]


def compile_all(config, target, devices, programs=PROGRAMS) -> dict:
  import jax
  from train import aot_programs, aot_report
  from vlm import attention
  bad = set(programs) - set(PROGRAMS)
  if bad:
    raise UserError(f"--programs: {sorted(bad)} not in {PROGRAMS}")
  with attention.compiling_for(target.platform):
    p, progs = aot_programs.training(config, devices)
    chosen = [x for x in progs if {"train_step": "train", "eval_step": "eval",
                                   "s2_tower": "tower"}[x.name] in programs]
    if "serve" in programs:
      chosen += aot_programs.serving_programs(p, devices, target.platform)
    results = [aot_report.analyze(x, target, len(p.mesh.devices.flat)) for x in chosen]
  impl = config.model.attention
  return {"config": config.name, "target": {"name": target.name, "about": target.about,
                                            "devices": len(devices), "platform": target.platform},
          "mesh": dict(p.mesh.shape), "remat": config.model.remat,
          "attention": (f"auto -> {attention._auto(target.platform)}" if impl == "auto" else impl),
          "grad_accum": int(config.optim.grad_accum), "global_batch": int(config.data.global_batch),
          "versions": {"jax": jax.__version__, **backend_versions()}, "programs": results}


def backend_versions() -> dict:
  from importlib import metadata
  out = {}
  for name in ("jax-cuda12-plugin", "libtpu", "nvidia-cudnn-cu12"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def search(config, target, devices) -> dict:
  """Train step over (remat, micro-batch per device), cheapest remat first: per remat, the
  largest micro-batch that keeps HEADROOM free (a costlier remat is tried only at micro-batches
  larger than a cheaper one reached). The choice: the cheapest remat that fits, at its largest
  micro-batch; the table shows what each costlier remat would buy."""
  from train import aot_programs
  from train.aot_report import HEADROOM
  g = int(config.data.global_batch)
  mesh = aot_programs.mesh_of(config, devices)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if g % batch_devices:
    raise UserError(f"data.global_batch {g} does not split over {batch_devices} batch devices")
  per_device = g // batch_devices
  sizes = [m for m in (2 ** i for i in range(12)) if m <= per_device and per_device % m == 0]
  rows, choice, best = [], None, 0
  for remat in REMATS:
    if best == per_device:
      break   # a cheaper remat already fits the whole per-device batch at once
    for mb in sorted((m for m in sizes if m > best), reverse=True):
      c = config.copy_and_resolve_references()
      c.model.remat = remat
      c.optim.grad_accum = per_device // mb
      try:
        r = compile_all(c, target, devices, ("train",))["programs"][0]
      except Exception as e:  # noqa: BLE001 - a setting that does not compile is a table row
        rows.append({"remat": remat, "micro_batch": mb, "error": f"{type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:120]}"})
        continue
      if "error" in r:   # XLA refused it (XLA:TPU's out-of-memory): a row that does not fit
        rows.append({"remat": remat, "micro_batch": mb, "error": r["error"][:120]})
        continue
      ok = r["headroom"] >= HEADROOM
      rows.append({"remat": remat, "micro_batch": mb, "grad_accum": per_device // mb,
                   "peak": r["memory"]["peak"], "headroom": r["headroom"], "fits": ok,
                   "compile_s": r["compile_s"],
                   "estimate_s": r.get("estimate", {}).get("step_s")})
      if ok:
        choice, best = choice or rows[-1], mb
        break
  overrides = ([f"--config.model.remat={choice['remat']}",
                f"--config.optim.grad_accum={choice['grad_accum']}"] if choice else [])
  return {"config": config.name, "target": target.name, "headroom_required": HEADROOM,
          "per_device_batch": per_device, "rows": rows, "choice": choice, "overrides": overrides}


def search_text(s: dict) -> str:
  from vlm.compiled import gib
  lines = [f"train.aot --search: {s['config']} on {s['target']}, {s['per_device_batch']} samples "
           f"per device per step, >= {s['headroom_required'] * 100:.0f}% headroom",
           f"{'remat':<16}{'micro-batch':>12}{'accum':>7}{'peak GiB':>10}{'headroom':>10}"
           f"{'compile s':>11}  estimate s (roofline)"]
  for r in s["rows"]:
    if "error" in r:
      lines.append(f"{r['remat']:<16}{r['micro_batch']:>12}  does not compile: {r['error']}")
      continue
    est = f"{r['estimate_s']:.3f}" if r["estimate_s"] else "-"
    lines.append(f"{r['remat']:<16}{r['micro_batch']:>12}{r['grad_accum']:>7}"
                 f"{gib(r['peak']):>10}{r['headroom'] * 100:>9.1f}%{r['compile_s']:>11.1f}  {est}")
  c = s["choice"]
  lines.append(f"choice: remat {c['remat']}, micro-batch {c['micro_batch']} per device "
               f"(grad_accum {c['grad_accum']})" if c else "choice: nothing fits")
  return "\n".join(lines)


def main(argv):
  with cli_errors(True if FLAGS.debug else None):
    sys.exit(_main(argv))


def _main(argv) -> int:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise UserError("--config is required (e.g. --config configs/stage2.py)")
  if FLAGS.target is None:
    raise UserError(f"--target is required, one of {sorted(TARGETS)}")
  if FLAGS.apply and not FLAGS.search:
    raise UserError("--apply needs --search")
  if not installed() or SITE not in sys.path:
    raise UserError(f"the compile-only backends are not installed in {SITE}: run `make aot-deps`"
                    " (and run this as `python -m train.aot`)")
  target = TARGETS[FLAGS.target]
  config = _stage(FLAGS.config).copy_and_resolve_references()
  devices = target_devices(target)
  if FLAGS.search:
    s = search(config, target, devices)
    if FLAGS.apply:
      print(" ".join(s["overrides"]) if s["overrides"] else "# nothing fits")
    else:
      print(json.dumps(s) if FLAGS.json else search_text(s))
    return 0 if s["choice"] else 1
  report = compile_all(config, target, devices, tuple(FLAGS.programs))
  from train.aot_report import text
  print(json.dumps(report) if FLAGS.json else text(report))
  train = [p for p in report["programs"] if p["program"] == "train_step"]
  return 1 if train and not train[0].get("fits") else 0


def entry(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if any(a in train_main.HELP for a in argv[1:]):
    FLAGS.mark_as_parsed()
    print(__doc__.strip() + "\n\n" + FLAGS.module_help(FLAGS.find_module_defining_flag("target"))
          + "\n\nThe config's fields and overrides: `python -m train.main --config FILE --help`.")
    sys.exit(0)
  with cli_errors(None):   # before the config is loaded: the cheap refusal first
    if not installed():
      raise UserError(f"the compile-only backends are not installed in {SITE}: run `make "
                      "aot-deps`")
  app.run(main, argv=train_main.resolve_config_arg(argv),
          flags_parser=train_main.parse_flags)


if __name__ == "__main__":
  entry()
