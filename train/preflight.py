"""One check of a whole run config before any data or weights are read: every field against its
rule in configs/common.py's RULES table (ranges, choices, paths, the rules across fields), every
stage of a chained config. All breaches are reported at once, one line each naming the field as
--config names it, its value and what is allowed:

  stage2.data.global_batch = 0: must be an integer >= 1

train.main, train.validate and train.aot call `check(config, workdir)`; train.trainer checks a
stage's values again (paths=False) for the callers that run a stage directly.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

from data.errors import UserError

_MISSING = object()


class ConfigError(UserError):
  """Breaches of the RULES table: `lines`, one per breach (the command line prints each as an
  `error:` line)."""

  def __init__(self, lines: list):
    super().__init__("\n".join(lines))
    self.lines = list(lines)


def get(config, name: str, default=_MISSING):
  """A dotted field of a ConfigDict ("optim.lr")."""
  node = config
  for part in name.split("."):
    if not hasattr(node, "keys") or part not in node:
      if default is _MISSING:
        raise KeyError(name)
      return default
    node = node[part]
  return node


def earlier_stage(config, stage: Optional[str], workdir: Optional[str]) -> Optional[str]:
  """The earlier stage of a chain whose output (its workdir or WORKDIR/final) `stage` starts from,
  or None."""
  if not stage or not workdir:
    return None
  init = config[stage].model.init
  if not isinstance(init, str) or not init:
    return None
  for earlier in config.chain[:list(config.chain).index(stage)]:
    d = os.path.join(os.path.abspath(workdir), earlier)
    if os.path.abspath(init) in (d, os.path.join(d, "final")):
      return earlier
  return None


class Context:
  """What a stage's rules ask beyond their own value: its other fields (`ctx["optim.lr"]`), the
  devices and the mesh, the network's image tokens, whether paths are checked."""

  def __init__(self, cfg, *, paths: bool, network=None, pending: bool = False,
               devices: Optional[int] = None):
    self.cfg, self.paths, self._network, self.pending = cfg, paths, network, pending
    self._devices = devices

  def __getitem__(self, name: str):
    return get(self.cfg, name, None)

  @functools.cached_property
  def available(self) -> Optional[int]:
    """Devices the run will have (None: not known, the rules on them pass)."""
    if self._devices is None:
      import jax
      return jax.device_count()
    return self._devices or None

  @functools.cached_property
  def devices(self) -> Optional[int]:
    n = self["mesh.num_devices"]
    if self.available is None:
      return None
    return n if isinstance(n, int) and 0 < n <= self.available else self.available

  @functools.cached_property
  def mesh_sizes(self) -> Optional[tuple]:
    """config.mesh.shape with its -1 resolved, or None when it cannot make a mesh (or the
    devices are not known)."""
    shape = self["mesh.shape"]
    if self.devices is None:
      return None
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
      return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and (s >= 1 or s == -1)
               for s in shape) or list(shape).count(-1) > 1:
      return None
    known = 1
    for s in shape:
      known *= s if s != -1 else 1
    out = tuple(self.devices // known if s == -1 else s for s in shape)
    return out if out[0] * out[1] * out[2] == self.devices else None

  @property
  def batch_devices(self) -> Optional[int]:
    """Devices the batch axis is split over (the mesh's data x fsdp; None: not known)."""
    return None if self.mesh_sizes is None else self.mesh_sizes[0] * self.mesh_sizes[1]

  @functools.cached_property
  def network(self):
    """The network the stage trains as far as it is known before any file but a model config is
    read (None where model.init is not there yet)."""
    if self._network is not None:
      return self._network
    from vlm.config import VLMConfig
    init = self["model.init"]
    arch = self["model.arch"]
    try:
      if init == "scratch":   # the image geometry does not need the tokenizer's vocabulary
        return VLMConfig.from_dict(arch.to_dict() if hasattr(arch, "to_dict") else dict(arch))
      from train.source import source_config
      return source_config(self.cfg)
    except (UserError, OSError, ValueError, TypeError, KeyError, AttributeError):
      return None   # model.init's own rule reports it

  @property
  def image_tokens(self) -> Optional[int]:
    """Placeholder tokens of one image (None: text only, anyres (they vary), or not known)."""
    net = self.network
    if net is None or net.vision is None or net.tiler.kind == "anyres":
      return None
    return net.image_tokens()

  def init_problem(self, init) -> Optional[str]:
    """check_init's message for model.init, or None (an earlier stage's output is not there
    until that stage ran)."""
    if self.pending or not isinstance(init, str):
      return None if self.pending else "model.init must be a string"
    from vlm.config import PRESETS
    if init.startswith("preset:") and init[len("preset:"):] not in PRESETS:
      return (f"model.init: unknown preset {init[len('preset:'):]!r} (known: "
              f"{', '.join(sorted(PRESETS))})")
    from train.source import check_init
    try:
      check_init(self.cfg)
    except UserError as e:
      return str(e)
    return None


def _shown(value) -> str:
  text = repr(value.to_dict() if hasattr(value, "to_dict") else value)
  return text if len(text) <= 100 else text[:97] + "..."


def breaches(cfg, ctx: Context, prefix: str = "") -> list:
  """One line per field of `cfg` (one stage) that its rule refuses."""
  from configs.common import RULES
  from configs.rules import Line
  out = []
  for name, rule in RULES.items():
    value = get(cfg, name, _MISSING)
    if value is _MISSING or (rule.path and not ctx.paths):
      continue
    why = rule.breach(value, ctx)
    if isinstance(why, Line):
      out.append(f"{prefix[:-1]}: {why}" if prefix else why)
    elif why:
      out.append(f"{prefix}{name} = {_shown(value)}: {why}")
  return out


def check(config, workdir: Optional[str] = None, *, paths: bool = True,
          devices: Optional[int] = None, writes: bool = True) -> None:
  """Every stage of `config` against RULES; ConfigError listing every breach. `workdir`: what
  "{workdir}" stood for (a stage starting from an earlier stage's output is not held to its
  existence), checked to be writable unless writes=False. paths=False: all but whether paths
  exist (before a config's `prepare` step wrote them). devices: how many the run will have
  (default: this machine's, jax.device_count(); 0: not known, the mesh and batch-split rules are
  not checked)."""
  from configs.rules import Directory
  lines = []
  if writes and workdir:
    why = Directory(writable=True).breach(workdir, None)
    if why:
      lines.append(f"--workdir {workdir}: {why}")
  stages = list(config.chain) if config.get("chain") else [None]
  missing = [s for s in stages if s is not None and s not in config]
  if missing:
    raise ConfigError(lines + [f"chain = {tuple(stages)!r}: no config for the stage {s!r}"
                               for s in missing])
  networks = {}
  for stage in stages:
    cfg = config[stage] if stage else config
    earlier = earlier_stage(config, stage, workdir)
    ctx = Context(cfg, paths=paths, network=networks.get(earlier), pending=earlier is not None,
                  devices=devices)
    lines += breaches(cfg, ctx, f"{stage}." if stage else "")
    networks[stage] = ctx.network
  if lines:
    raise ConfigError(lines)


def rule_of(config, name: str):
  """The rule of a dotted field as `--help` lists it (a chained config's stage prefix dropped),
  or None."""
  from configs.common import RULES
  if config.get("chain") and name.split(".")[0] in config.chain:
    name = name.split(".", 1)[1] if "." in name else ""
  return RULES.get(name)
