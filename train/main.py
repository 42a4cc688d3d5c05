r"""Train a model from a config file.

  python -m train.main --config configs/stage2.py [--config.optim.lr=1e-5 ...] [--workdir DIR]

A bare `--config stage2.py` is looked up in configs/. A config with `chain` runs its stages in
order, each in WORKDIR/<stage>, and "{workdir}" in any string field stands for WORKDIR. A stage that
already wrote WORKDIR/<stage>/final is skipped; an interrupted one resumes from its newest
checkpoint. Multi-host: jax.distributed.initialize() reads TPU-pod and SLURM environments by
itself (--distributed=auto); --coordinator_address/--num_processes/--process_id set it by hand.
See train/launch/ for TPU-pod and SLURM launchers.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")

config_flags.DEFINE_config_file("config", None,
                                "Training config file (configs/NAME.py, or just NAME.py).")
flags.DEFINE_string("workdir", None, "Run directory (default runs/<config.name>).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize: auto = when a cluster environment (TPU pod, SLURM "
                  "with several tasks) or the flags below ask for it.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_list("local_device_ids", None, "Devices this process drives (default: all visible).")
flags.DEFINE_integer("cpu_devices", None, "CPU platform only: devices per process "
                     "(jax_num_cpu_devices), for testing sharded code without accelerators.")
FLAGS = flags.FLAGS


def resolve_config_arg(argv: list) -> list:
  """`--config NAME.py[:args]` -> configs/NAME.py when NAME.py is not a path that exists."""
  out = list(argv)
  for i, a in enumerate(out):
    if a == "--config" and i + 1 < len(out):
      out[i + 1] = _lookup(out[i + 1])
    elif a.startswith("--config="):
      out[i] = "--config=" + _lookup(a.split("=", 1)[1])
  return out


def _lookup(spec: str) -> str:
  path, sep, rest = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(CONFIGS, path)):
    path = os.path.join(CONFIGS, path)
  return path + sep + rest


def _cluster_env() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def init_distributed():
  import jax
  if FLAGS.cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  explicit = FLAGS.coordinator_address or FLAGS.num_processes
  if FLAGS.distributed == "off" or (FLAGS.distributed == "auto" and not explicit and
                                    not _cluster_env()):
    return
  if (FLAGS.cpu_devices or os.environ.get("JAX_PLATFORMS", "") == "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  ids = [int(x) for x in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                             local_device_ids=ids)


def fill_workdir(config, workdir: str):
  """Replace "{workdir}" in every string (and string tuple) field, in place."""
  for key, value in config.items():
    if hasattr(value, "items"):
      fill_workdir(value, workdir)
    elif isinstance(value, str) and "{workdir}" in value:
      config[key] = value.replace("{workdir}", workdir)
    elif isinstance(value, (tuple, list)) and any(isinstance(v, str) and "{workdir}" in v
                                                  for v in value):
      config[key] = type(value)(v.replace("{workdir}", workdir) if isinstance(v, str) else v
                                for v in value)


def run(config, workdir: str) -> list:
  """Run a config (one stage, or a chain of stages); returns each stage's result."""
  import jax
  from train import trainer
  workdir = os.path.abspath(workdir)
  config = config.copy_and_resolve_references()
  fill_workdir(config, workdir)
  if config.get("prepare"):
    module, fn = config.prepare.split(":")
    if jax.process_index() == 0:
      getattr(importlib.import_module(module), fn)(workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("prepare")
  if not config.get("chain"):
    return [trainer.run(config, workdir)]
  results = []
  for name in config.chain:
    out = trainer.run(config[name], os.path.join(workdir, name))
    results.append(out)
    if out["preempted"]:
      break
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required (e.g. --config configs/stage2.py)")
  logging.getLogger().setLevel(logging.WARNING)   # orbax / grain are chatty at INFO
  for name in ("train", "data"):
    logging.getLogger(name).setLevel(logging.INFO)
  init_distributed()
  from vlm import compile_cache
  cache = compile_cache.enable()
  logging.getLogger("train").info("compilation cache: %s", cache or "off")
  workdir = FLAGS.workdir or os.path.join("runs", FLAGS.config.name)
  results = run(FLAGS.config, workdir)
  if any(r["preempted"] for r in results):
    sys.exit(143)   # 128 + SIGTERM: the run is not finished; rerun the command to resume


def entry(argv=None):
  app.run(main, argv=resolve_config_arg(sys.argv if argv is None else argv))


if __name__ == "__main__":
  entry()
