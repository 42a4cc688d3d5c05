"""Mesh construction and logical-axis sharding (MaxText style).

Every parameter carries logical axis names (nn.with_logical_partitioning); `rules` map them to the
('data', 'fsdp', 'tensor') mesh. A logical axis whose size does not divide by its mesh axes falls
back to replication on that dimension, so one rule set serves tiny test models and 8B models.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

DEFAULT_RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("layers", None),
    # LoRA's rank axis takes fsdp where the adapter's other axis does not (B [rank, heads], A of
    # down [mlp, rank]), so no adapter or its optimizer moments sit whole on every device.
    ("lora", "fsdp"),
    ("norm", None),
)


def make_mesh(shape: Optional[Sequence[int]] = None, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; default puts every device on 'fsdp'. -1 takes the rest.

  Built with Mesh directly (Auto axes): jax.make_mesh defaults to Explicit axes in new JAX."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape or (1, -1, 1))
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  try:  # contiguous sub-meshes on real accelerators (ICI / NVLink locality)
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(tuple(shape), devices)
  except Exception:  # CPU / odd topologies: plain reshape
    arr = np.array(devices).reshape(shape)
  return Mesh(arr, AXES)


def _mesh_axes(name, rules):
  for logical, mesh_axes in rules:
    if logical == name:
      return mesh_axes
  return None


def spec_for(logical: Sequence, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """Logical names + concrete shape -> PartitionSpec, skipping mesh axes already used or that do
  not divide the dimension."""
  used, out = set(), []
  for name, dim in zip(logical, shape):
    axes = _mesh_axes(name, rules) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    keep = []
    for a in axes:
      size = mesh.shape[a]
      if a in used or size == 1:
        continue
      if dim % (size * int(np.prod([mesh.shape[k] for k in keep] or [1]))) == 0:
        keep.append(a)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def logical_specs(boxed_tree):
  """Tree of logical PartitionSpecs (from nn.Partitioned boxes; unboxed leaves get P())."""
  return nn.get_partition_spec(boxed_tree)


def shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a (possibly abstract) boxed parameter tree."""
  specs = logical_specs(boxed_tree)
  values = nn.unbox(boxed_tree)
  return jax.tree_util.tree_map(
      lambda s, v: NamedSharding(mesh, spec_for(tuple(s), v.shape, mesh, rules)), specs, values,
      is_leaf=lambda x: isinstance(x, P))


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings of a VLM's full parameter tree, computed from shapes alone (nothing allocated)."""
  from vlm.model import abstract_params
  return shardings(abstract_params(config, boxed=True), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  """batch_sharding for every array of a batch dict."""
  return {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard(tree, sharding_tree):
  """Place a host tree on the mesh leaf by leaf (sharding_tree may be a prefix of tree)."""
  return jax.tree_util.tree_map(lambda s, x: jax.device_put(x, s), sharding_tree, tree)
