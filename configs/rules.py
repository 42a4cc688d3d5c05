"""The kinds of rule configs/common.py's RULES table gives each config field. A rule says what it
allows in words (`str(rule)`, what `train.main --help` shows and what a breach names) and checks a
value: `rule.breach(value, ctx)` is None when the value is allowed, else the allowed range.

`ctx` (train/preflight.py) answers what a rule needs beyond its own value: `ctx[field]` (another
field of the same stage) and what follows from the machine and the model (`ctx.batch_devices`,
`ctx.devices`, `ctx.image_tokens`, None when not known yet). Path rules (`path = True`) are checked
only once the files may exist (after a config's `prepare` step).
"""
from __future__ import annotations

import numbers
import os
import re
from typing import Callable, Optional


class Rule:
  path = False

  def breach(self, value, ctx) -> Optional[str]:
    return None if self.allows(value, ctx) else f"must be {self}"

  def allows(self, value, ctx) -> bool:
    raise NotImplementedError


def _number(value, integer: bool) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  return not integer or isinstance(value, numbers.Integral)


class Range(Rule):
  """A number in [lo, hi] (either end open, or absent); `note` says what a special value means."""

  def __init__(self, lo=None, hi=None, *, lo_open=False, hi_open=False, integer=False, note=""):
    self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
    self.integer, self.note = integer, note

  def allows(self, value, ctx) -> bool:
    if not _number(value, self.integer):
      return False
    lo_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
    hi_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
    return lo_ok and hi_ok

  def __str__(self) -> str:
    kind = "an integer " if self.integer else ""
    if self.lo is None and self.hi is None:
      return kind.strip() or "a number"
    if self.hi is None:
      text = f"{kind}{'>' if self.lo_open else '>='} {self.lo:g}"
    else:
      text = (f"{kind}in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
              f"{')' if self.hi_open else ']'}")
    return text + (f" ({self.note})" if self.note else "")


def above(lo, note=""):
  return Range(lo, lo_open=True, note=note)


def at_least(lo, note="", integer=True):
  return Range(lo, integer=integer, note=note)


def between(lo, hi, *, hi_open=False, note=""):
  return Range(lo, hi, hi_open=hi_open, note=note)


INTEGER = Range(integer=True)


class OneOf(Rule):
  def __init__(self, *names):
    self.names = names

  def allows(self, value, ctx) -> bool:
    return isinstance(value, str) and value in self.names

  def __str__(self) -> str:
    return "one of " + " | ".join(repr(n) if n == "" else n for n in self.names)


class Kind(Rule):
  """A value of a Python type (bool, str, ...), described in words."""

  def __init__(self, types, words: str):
    self.types, self.words = types, words

  def allows(self, value, ctx) -> bool:
    return isinstance(value, self.types)

  def __str__(self) -> str:
    return self.words


class Maybe(Rule):
  """None (the pipeline's or the model's default), or what `rule` allows."""

  def __init__(self, rule: Rule):
    self.rule = rule
    self.path = rule.path

  def breach(self, value, ctx):
    return None if value is None else self.rule.breach(value, ctx)

  def __str__(self) -> str:
    return f"None or {self.rule}"


def optional(rule: Rule) -> Maybe:
  return Maybe(rule)


class SubsetOf(Rule):
  def __init__(self, names):
    self.names = tuple(names)

  def allows(self, value, ctx) -> bool:
    return isinstance(value, (tuple, list)) and all(v in self.names for v in value)

  def __str__(self) -> str:
    return f"names from {', '.join(self.names)}"


class Regexes(Rule):
  """Regular expressions (a tuple of them); `nonempty`: at least one."""

  def __init__(self, nonempty: bool = False):
    self.nonempty = nonempty

  def breach(self, value, ctx):
    if not isinstance(value, (tuple, list)) or (self.nonempty and not value):
      return f"must be {self}"
    for v in value:
      try:
        re.compile(v)
      except (re.error, TypeError) as e:
        return f"{v!r} is not a regular expression ({e})"
    return None

  def __str__(self) -> str:
    return ("one or more" if self.nonempty else "a tuple of") + " regular expressions"


class Line(str):
  """A breach that is a whole line of its own (it names the field itself)."""


class Where(Rule):
  """A rule on a field and others, described in words: `fn(value, ctx)` is False for a breach,
  True or None (what it needs is not known yet) for none, or a string: a breach in its own words
  (a Line). `detail(ctx)`: what a breach adds in brackets (e.g. the number it was held to)."""

  def __init__(self, words: str, fn: Callable, *, path: bool = False,
               detail: Optional[Callable] = None):
    self.words, self.fn, self.path, self.detail = words, fn, path, detail

  def breach(self, value, ctx):
    got = self.fn(value, ctx)
    if isinstance(got, str):
      return Line(got)
    if got is not False:
      return None
    detail = self.detail(ctx) if self.detail else ""
    return f"must be {self.words}" + (f" ({detail})" if detail else "")

  def __str__(self) -> str:
    return self.words


class All(Rule):
  """Every one of `rules` (the first breach is reported)."""

  def __init__(self, *rules: Rule):
    self.rules = rules
    self.path = any(r.path for r in rules)

  def breach(self, value, ctx):
    for r in self.rules:
      if ctx.paths or not r.path:
        why = r.breach(value, ctx)
        if why:
          return why
    return None

  def __str__(self) -> str:
    return "; ".join(str(r) for r in self.rules)


# --- paths ---------------------------------------------------------------------------------------

def _local_files(spec: str) -> list:
  """The local files a data path names: none for tfds:NAME:SPLIT, every shard of a comma list."""
  if spec.startswith("tfds:"):
    return []
  return spec.split(",") if ".array_record" in spec else [spec]


class Files(Rule):
  """Data files that exist (tfds:NAME:SPLIT is not a local file); `nonempty`: at least one."""
  path = True

  def __init__(self, nonempty: bool):
    self.nonempty = nonempty

  def breach(self, value, ctx):
    if isinstance(value, str):
      value = (value,)
    if not isinstance(value, (tuple, list)) or (self.nonempty and not value):
      return f"must be {self}"
    missing = [p for spec in value for p in _local_files(spec) if not os.path.isfile(p)]
    return f"file not found: {missing[0]}" if missing else None

  def __str__(self) -> str:
    return ("one or more" if self.nonempty else "a tuple of") + " existing data files"


class Directory(Rule):
  """An existing directory (None or "": not set); `writable`: one this run may create or write."""
  path = True

  def __init__(self, writable: bool = False):
    self.writable = writable

  def breach(self, value, ctx):
    if value in (None, ""):
      return None
    if not isinstance(value, str):
      return f"must be {self}"
    if not self.writable:
      return None if os.path.isdir(value) else "directory not found"
    d = os.path.abspath(value)
    while not os.path.exists(d):
      d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
      return f"not writable ({d})"
    return None

  def __str__(self) -> str:
    return "a writable directory" if self.writable else "an existing directory"
