r"""Train a model from a config file.

  python -m train.main --config configs/stage2.py [--config.optim.lr=1e-5 ...] [--workdir DIR]
  python -m train.main --config configs/demo.py --config.stage2.optim.lr=1e-3   # a chained config

A bare `--config stage2.py` is looked up in configs/. A config with `chain` runs its stages in
order, each in WORKDIR/<stage> (override a stage's field as --config.STAGE.FIELD), and "{workdir}"
in any string field stands for WORKDIR. A stage that already wrote WORKDIR/<stage>/final and its
completion record (same config, same data) is skipped; an interrupted one resumes from its newest
checkpoint. `--help` lists the config's fields with their values and allowed ranges; the whole
config is checked against them (train/preflight.py) before any data or weights are read.

Mistakes in the command line, the config or the data end in one line, `error: <what>`, and exit
status 2 (--debug or MEDVLM_DEBUG=1: the full traceback). Multi-host: jax.distributed.initialize()
reads TPU-pod and SLURM environments by itself (--distributed=auto);
--coordinator_address/--num_processes/--process_id set it by hand. See train/launch/ for TPU-pod
and SLURM launchers.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from data.errors import UserError, cli_errors

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
flags.DEFINE_bool("debug", False, "Full tracebacks for user errors too (as MEDVLM_DEBUG=1).")
FLAGS = flags.FLAGS
HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")


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


def config_spec(argv: list):
  """The --config value on a command line (None when absent)."""
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def load_config(spec: str):
  """The ConfigDict of `FILE.py[:args]`, as --config loads it."""
  path, sep, args = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file not found ({path})")
  loader = importlib.util.spec_from_file_location("_train_config", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(*([args] if sep else []))


def _fields(config, prefix: str = "") -> list:
  """(dotted name, value) of every leaf field."""
  out = []
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and len(value):
      out += _fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def check_overrides(argv: list, config, where: str = "the config") -> None:
  """Every --config.FIELD on the command line names a field of `config`: an unknown one is a
  UserError naming the nearest fields (ml_collections' own error is an escaped repr at the end of
  a long traceback)."""
  for a in argv:
    m = re.match(r"^--(?:no)?config\.([^=\s\[]+)", a)
    if not m:
      continue
    node, done = config, []
    for part in m.group(1).split("."):
      if not hasattr(node, "keys"):
        break   # inside a value (e.g. a dict field): ml_collections decides
      if part not in node:
        near = difflib.get_close_matches(part, sorted(node.keys()), n=2, cutoff=0.6)
        hint = [".".join(done + [n]) for n in near]
        if not hint and not done:   # a chained config: the field lives in its stages
          hint = [n for n, _ in _fields(config) if (n + ".").startswith(
              tuple(f"{k}.{m.group(1)}." for k in config.keys()))][:3]
        raise UserError(
            f"unknown config field --config.{m.group(1)} in {where}" +
            (f" (did you mean {' or '.join('--config.' + h for h in hint)}?)" if hint else
             "; `python -m train.main --config FILE --help` lists the fields"))
      node, done = node[part], done + [part]


def usage(argv: list) -> str:
  """--help: this docstring, the flags, and the fields of the given config (or of the common
  base every config starts from), each with its value."""
  spec = config_spec(argv)
  if spec is not None:
    config, title = load_config(spec), f"Fields of {spec.partition(':')[0]}"
  else:
    from configs import common
    config, title = common.base(), "Fields every config has (configs/common.py documents them)"
  module = FLAGS.find_module_defining_flag("workdir") or __name__
  flag_help = FLAGS.get_help() if "--helpfull" in argv else FLAGS.module_help(module)
  lines = [__doc__.strip(), "", flag_help, "",
           f"{title}; override any with --config.FIELD=VALUE:"]
  from train.preflight import rule_of
  for name, value in _fields(config):
    rule = rule_of(config, name)
    value = value.to_dict() if hasattr(value, "to_dict") else value
    lines.append(f"  {name} = {value!r}" + (f"  ({rule})" if rule else ""))
  return "\n".join(lines)


def parse_flags(argv: list) -> list:
  """absl's flag parsing with this command's error path: --help prints usage() and exits 0; a
  bad flag or --config override is one `error:` line and exit status 2."""
  with cli_errors(True if "--debug" in argv else None):
    if any(a in HELP for a in argv[1:]):
      try:
        print(usage(argv), flush=True)
      except BrokenPipeError:   # `--help | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(0)
    spec = config_spec(argv)
    if spec is not None:
      check_overrides(argv, load_config(spec), spec.partition(":")[0])
    try:
      return FLAGS(argv)
    except flags.Error as e:
      raise UserError(str(e)) from e


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


def resolved(config, workdir: str):
  """A copy of `config` with its references resolved and "{workdir}" filled in."""
  config = config.copy_and_resolve_references()
  fill_workdir(config, os.path.abspath(workdir))
  return config


def run(config, workdir: str) -> list:
  """Run a config (one stage, or a chain of stages); returns each stage's result."""
  import jax
  from train import preflight, trainer
  workdir = os.path.abspath(workdir)
  config = resolved(config, workdir)
  # every value (and path, unless a `prepare` step writes them) before anything is written
  preflight.check(config, workdir, paths=not config.get("prepare"))
  if config.get("prepare"):
    module, fn = config.prepare.split(":")
    if jax.process_index() == 0:
      getattr(importlib.import_module(module), fn)(workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("prepare")
  preflight.check(config, workdir)   # and the paths, once `prepare` wrote its files
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
  with cli_errors(True if FLAGS.debug else None):
    _main(argv)


def _main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise UserError("--config is required (e.g. --config configs/demo.py)")
  logging.getLogger().setLevel(logging.WARNING)   # orbax / grain are chatty at INFO
  for name in ("train", "data"):
    logging.getLogger(name).setLevel(logging.INFO)
  init_distributed()
  workdir = FLAGS.workdir or os.path.join("runs", FLAGS.config.name)
  from train import preflight
  preflight.check(resolved(FLAGS.config, workdir), os.path.abspath(workdir),
                  paths=not FLAGS.config.get("prepare"))
  from vlm import compile_cache
  cache = compile_cache.enable()
  logging.getLogger("train").info("compilation cache: %s", cache or "off")
  results = run(FLAGS.config, workdir)
  if any(r["preempted"] for r in results):
    sys.exit(143)   # 128 + SIGTERM: the run is not finished; rerun the command to resume


def entry(argv=None):
  app.run(main, argv=resolve_config_arg(sys.argv if argv is None else argv),
          flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
