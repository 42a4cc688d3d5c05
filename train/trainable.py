"""The trainable / frozen split of a parameter tree: `select` marks the paths config.trainable's
patterns match, `partition` splits the tree by that mask into two sparse trees (trainable float32
masters and optimizer state on one side, frozen weights kept apart, never donated or checkpointed),
and `combine` puts them back together for the forward pass and the final model."""
from __future__ import annotations

import re
from typing import Iterable

from flax.traverse_util import flatten_dict, unflatten_dict


def select(params, patterns: Iterable[str]):
  """Boolean tree: True where the '/'-joined path matches one of the regex patterns."""
  regs = [re.compile(p) for p in patterns]
  flat = flatten_dict(params)
  return unflatten_dict({k: any(r.search("/".join(k)) for r in regs) for k in flat})


def partition(params, mask):
  """Split a tree by a boolean mask into (selected, rest), each a sparse nested dict."""
  flat, m = flatten_dict(params), flatten_dict(mask)
  return (unflatten_dict({k: v for k, v in flat.items() if m[k]}),
          unflatten_dict({k: v for k, v in flat.items() if not m[k]}))


def combine(*trees):
  """Inverse of partition: merge sparse nested dicts (later trees win on overlap)."""
  out = {}
  for t in trees:
    out.update(flatten_dict(t))
  return unflatten_dict(out)
