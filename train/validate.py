"""Check a whole data set the way training will read it, before a run spends time on it.

  python -m train.validate --config configs/stage2.py [--config.data.image_root=DIR ...]
  python -m train.validate --config demo.py --workdir runs/demo --stage stage2

Takes what `python -m train.main` takes (a config file, a bare NAME.py is looked up in configs/,
`--config.*` overrides, --workdir for "{workdir}"); a chained config is checked stage by stage
(--stage picks some). Every sample of data.paths and eval.paths goes through the training
pipeline's own per-sample code (data.pipeline.SampleProcessor: the JSON record, the image read
inside the image root, decoded and resized, the template and loss mask, the max_len cut), so the
report is exactly what training would skip (lenient mode) or stop at (strict): counts per reason
with the first examples of each, the histogram of token lengths before the max_len cut, and how
many samples exceed max_len. The bad samples are then replayed in the order training reads them
(the seeded shuffle, every epoch it plans) through training's own skip guard
(data.pipeline.SkipCounting: data.max_skipped_fraction, skip_check_after, max_leading_skips), so
"training would stop at sample N" is said where, and why, the run would stop.

Exit status: 0; 1 when training would stop (strict mode, data.strict or --strict, at a bad sample;
lenient mode at its skip guard) or a data set has no usable sample; 2 for an error before any
sample is read (a config field out of its range, a missing or malformed data file, a bad
override), printed as `error:` lines (one a breach).
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import importlib
import os
import sys
import threading
from typing import Optional

from data.errors import UserError, cli_errors
from data.pipeline import SKIP, SampleProcessor, open_sources

BAR = 40     # characters of the longest histogram bar
BINS = 8     # equal-width length bins up to max_len


class _Measured(SampleProcessor):
  """The training processor, lenient, also noting each sample's token count before the cut."""

  def __init__(self, cfg, source):
    super().__init__(dataclasses.replace(cfg, strict=False), source)
    self._seen = threading.local()

  def _encode(self, sample, tokens, max_len) -> dict:
    from data.conversation import truncate
    full = super()._encode(sample, tokens, None)
    self._seen.length = len(full["input_ids"])
    return truncate(full, max_len, self.cfg.image_token_id, sample.get("id"))

  def measure(self, index: int) -> tuple:
    """(skip reason or None, message, token count before the cut or None)."""
    self._seen.length = None
    out = self(index)
    return out.get(SKIP), out.get("message"), self._seen.length


@dataclasses.dataclass
class Report:
  """What one data set (a stage's train or eval files) holds, sample by sample."""
  name: str
  files: dict                   # path -> [samples, skipped]
  max_len: int
  strict: bool
  skipped: dict = dataclasses.field(default_factory=dict)    # reason -> count
  examples: dict = dataclasses.field(default_factory=dict)   # reason -> [(index, message)]
  lengths: list = dataclasses.field(default_factory=list)    # usable samples, before the cut
  too_long: list = dataclasses.field(default_factory=list)   # lengths of those skipped as too long
  bad: dict = dataclasses.field(default_factory=dict)        # index -> (reason, message)
  stop: Optional[str] = None    # where and why training would stop on this data (stops_at)

  @property
  def samples(self) -> int:
    return sum(n for n, _ in self.files.values())

  @property
  def usable(self) -> int:
    return self.samples - sum(self.skipped.values())

  @property
  def over_kept(self) -> int:
    """Usable samples longer than max_len (training cuts them to it)."""
    return sum(n > self.max_len for n in self.lengths)

  def failed(self) -> bool:
    return self.usable == 0 or self.stop is not None or (self.strict and bool(self.skipped))


def scan(cfg, name: str, *, threads: int = 2, limit: Optional[int] = None,
         examples: int = 3) -> Report:
  """Every sample of `cfg` (a data.pipeline.DataConfig) through the training processor."""
  from data.llm_client import run_pool
  source = open_sources(cfg)
  n = len(source) if limit is None else min(limit, len(source))
  proc = _Measured(cfg, source)
  files = {s.path: [0, 0] for s in source.sources}
  rep = Report(name, files, cfg.max_len, cfg.strict)

  def done(i, result, err):
    if err is not None:
      raise err
    reason, message, length = result
    path = source.locate(i)[0].path
    files[path][0] += 1
    if reason is None:
      rep.lengths.append(length)
      return
    files[path][1] += 1
    rep.bad[i] = (reason, message)
    rep.skipped[reason] = rep.skipped.get(reason, 0) + 1
    shown = rep.examples.setdefault(reason, [])
    bisect.insort(shown, (i, message))   # the first in file order, whatever the thread order
    del shown[examples:]
    if reason == "too_long" and length is not None:
      rep.too_long.append(length)

  run_pool(list(range(n)), proc.measure, done, concurrency=threads, description=name)
  return rep


def stops_at(rep: Report, cfg, steps: int = 0) -> Optional[str]:
  """Where training would stop on the data `rep` scanned: its bad samples replayed through the
  training iterator's own skip accounting (data.pipeline.SkipCounting over shard_indices: the
  seeded order and every epoch the run reads; `steps` > 0 with endless epochs: as many epochs as
  that many global batches take) with the run's skip guard, or in strict mode one that stops at
  the first bad sample. None when it would not stop."""
  import grain.python as gp
  from data.pipeline import SKIP, SkipCounting, SkipGuard, SkipGuardError, shard_indices
  n = rep.samples
  epoch = len(shard_indices(n, dataclasses.replace(cfg, num_epochs=1), None))
  epochs = cfg.num_epochs
  if epochs is None:   # train.steps: the data repeats until the steps are done
    epochs = max(1, -(-steps * cfg.global_batch // max(rep.usable, 1)))
  guard = (SkipGuard(0.0, 1, 0, epoch) if cfg.strict else SkipGuard.of(cfg, epoch))
  marker = lambda i: ({SKIP: rep.bad[i][0], "message": rep.bad[i][1]} if i in rep.bad else {})
  order = shard_indices(n, dataclasses.replace(cfg, num_epochs=epochs), None)
  it = iter(SkipCounting(order.map(marker).to_iter_dataset(gp.ReadOptions(num_threads=0)), 0,
                         guard))
  try:
    for _ in it:
      pass
  except SkipGuardError as e:
    read = it.get_state()["guard"][0]
    if cfg.strict:
      return (f"training would stop at sample {read} (strict mode: "
              f"{rep.bad[int(order[read - 1])][1]})")
    return f"training would stop at sample {read}: {e}"
  return None


def histogram(lengths: list, max_len: int) -> list:
  """Lines of a text histogram: BINS equal bins up to max_len, then one bin beyond it."""
  ls = sorted(lengths)
  below = lambda x: bisect.bisect_right(ls, x)   # how many are <= x
  width = max(1, -(-max_len // BINS))
  edges = [(k * width + 1, min((k + 1) * width, max_len)) for k in range(-(-max_len // width))]
  rows = [(f"{lo}-{hi}", below(hi) - below(lo - 1)) for lo, hi in edges]
  beyond = len(ls) - below(max_len)
  if beyond:
    rows.append((f"> {max_len}", beyond))
  top = max(c for _, c in rows) or 1
  label = max(len(r) for r, _ in rows)
  return [f"{r:>{label}} {c:>7}  {'#' * round(BAR * c / top)}".rstrip() for r, c in rows]


def render(rep: Report) -> str:
  bad = sum(rep.skipped.values())
  mode = ("strict: training stops at the first" if rep.strict else
          "lenient: training skips them" if rep.stop is None else
          "lenient: too many for training's skip guard")
  out = [f"== {rep.name}: {rep.samples} samples, {rep.usable} usable, {bad} bad"
         + (f" ({mode})" if bad else "")]
  if len(rep.files) > 1:
    out += [f"   {p}: {n} samples, {bad} bad" for p, (n, bad) in rep.files.items()]
  else:
    out += [f"   {p}" for p in rep.files]
  if rep.skipped:
    out.append("bad samples by reason:")
    for reason, count in sorted(rep.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
      out.append(f"  {reason}: {count}")
      out += [f"    {msg}" for _, msg in rep.examples[reason]]
  if rep.lengths or rep.too_long:
    ls = sorted(rep.lengths + rep.too_long)
    pick = lambda q: ls[min(len(ls) - 1, int(q * len(ls)))]
    out.append(f"token lengths before the max_len cut (min {ls[0]}, median {pick(0.5)}, "
               f"p95 {pick(0.95)}, max {ls[-1]}):")
    out += ["  " + line for line in histogram(ls, rep.max_len)]
    too_long = rep.skipped.get("too_long", 0)
    out.append(f"{rep.over_kept + too_long} samples exceed max_len {rep.max_len}: "
               f"{rep.over_kept} cut to it, {too_long} skipped as too_long")
  if rep.stop:
    out.append(rep.stop)
  return "\n".join(out)


# --- the command line: the configs train.main takes ----------------------------------------------

def load_config(spec: str, overrides: list, workdir: Optional[str] = None) -> tuple:
  """(config, workdir) as `python -m train.main --config SPEC OVERRIDES... [--workdir WORKDIR]`
  would run them: "{workdir}" filled in, workdir default runs/<config.name>."""
  from absl import flags
  from ml_collections import config_flags
  from train.main import resolve_config_arg, resolved
  argv = ["train.validate", *resolve_config_arg(["--config", spec]), *overrides]
  if not os.path.isfile(argv[2].partition(":")[0]):
    raise UserError(f"config file not found: {spec} (looked in the current dir and configs/)")
  fv = flags.FlagValues()   # private: no clash with train.main's process-wide flags
  # sys_argv: the override flags are found in it (default: sys.argv, not this command line)
  config_flags.DEFINE_config_file("config", None, "training config", flag_values=fv,
                                  sys_argv=argv)
  try:
    extra = fv(argv)[1:]
    config = fv.config
    config.get("name")   # a config file that failed to load raises here
  except (AttributeError, KeyError) as e:   # ConfigDict's way to say: no such field
    key = str(getattr(e, "args", [""])[0]).strip("'\"")
    bad = [o.split("=")[0] for o in overrides if f".{key}" in o.split("=")[0]]
    raise UserError(f"{', '.join(bad) or '--config'}: {spec} has no field {key!r}") from None
  except (flags.Error, OSError) as e:
    raise UserError(f"--config {spec}: {e}") from None
  if extra:
    raise UserError(f"unexpected arguments: {extra}")
  workdir = os.path.abspath(workdir or os.path.join("runs", config.name))
  return resolved(config, workdir), workdir


def _network(config, stage: Optional[str], workdir: str):
  """The network a stage trains, for its template, image geometry and placeholder counts: as
  train.trainer plans it, or, for a stage starting from an earlier stage of the same chain that
  has not been trained yet, that stage's network."""
  from train.plan import train_config
  from train.preflight import earlier_stage
  from train.source import resolve_init, source_config
  from vlm import checkpoint
  cfg = config[stage] if stage else config
  earlier = earlier_stage(config, stage, workdir)
  if earlier and not checkpoint.is_checkpoint(resolve_init(cfg.model.init)):
    return train_config(cfg, _network(config, earlier, workdir))
  return train_config(cfg, source_config(cfg))


def data_sets(config, stage: Optional[str], workdir: str) -> list:
  """[(name, DataConfig)]: the stage's training data and, if it has one, its held-out set."""
  from train.batches import data_config
  cfg = config[stage] if stage else config
  net = _network(config, stage, workdir)
  prefix = f"{stage} " if stage else ""
  out = [(prefix + "train", data_config(cfg, net))]
  if cfg.eval.paths:
    out.append((prefix + "eval", data_config(cfg, net, eval_=True)))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m train.validate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True,
                 help="training config, as train.main takes it (configs/NAME.py or NAME.py); "
                 "--config.FIELD=VALUE overrides follow it")
  p.add_argument("--workdir", help="what \"{workdir}\" stands for (default runs/<config.name>, "
                 "as train.main)")
  p.add_argument("--stage", action="append",
                 help="chained configs: check only this stage (repeatable; default: all)")
  p.add_argument("--strict", action="store_true",
                 help="exit 1 on any bad sample, whatever data.strict says")
  p.add_argument("--examples", type=int, default=3, help="examples shown per reason (default 3)")
  p.add_argument("--limit", type=int, help="check only the first N samples of each data set")
  p.add_argument("--threads", type=int,
                 help="samples decoded at once (default: data.read_threads)")
  p.add_argument("--prepare", action="store_true",
                 help="first run the config's `prepare` step (the demo writes its data there), "
                 "as train.main does")
  return p


def run(args, overrides: list) -> int:
  from train import preflight
  config, workdir = load_config(args.config, overrides, args.workdir)
  # the devices are the run's machine's, and validate writes nothing to the workdir
  preflight.check(config, workdir, paths=False, devices=0, writes=False)
  if args.prepare and config.get("prepare"):
    module, fn = config.prepare.split(":")
    getattr(importlib.import_module(module), fn)(workdir)
  preflight.check(config, workdir, devices=0, writes=False)
  chain = list(config.chain) if config.get("chain") else [None]
  if args.stage:
    unknown = [s for s in args.stage if s not in chain]
    if unknown:
      raise UserError(f"--stage {unknown}: {config.name} has stages {chain}" if chain[0] else
                      f"--stage: {config.name} is not a chained config")
    chain = [s for s in chain if s in args.stage]
  failed = False
  for stage in chain:
    for name, dcfg in data_sets(config, stage, workdir):
      if args.strict:
        dcfg = dataclasses.replace(dcfg, strict=True)
      rep = scan(dcfg, name, threads=args.threads or max(1, dcfg.read_threads), limit=args.limit,
                 examples=args.examples)
      cfg = config[stage] if stage else config
      if args.limit is None:   # where training stops is a question about the whole data
        rep.stop = stops_at(rep, dcfg, 0 if name.endswith("eval") else cfg.train.steps)
      print(render(rep), flush=True)
      failed |= rep.failed()
  return 1 if failed else 0


def main(argv=None) -> int:
  args, overrides = parser().parse_known_args(argv)
  with cli_errors():
    return run(args, overrides)


if __name__ == "__main__":
  sys.exit(main())
