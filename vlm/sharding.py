"""Mesh construction and logical-axis sharding (MaxText style).

Every parameter carries logical axis names (nn.with_logical_partitioning); `rules` map them to the
('data', 'fsdp', 'tensor') mesh. A logical axis whose size does not divide by its mesh axes falls
back to replication on that dimension, so one rule set serves tiny test models and 8B models.

Activations carry their own names (MaxText's scheme), pinned by `constrain` in every decoder and
tower block, so the mesh layout of the hidden states is chosen by the rules, not by XLA's cost
model (which, given only fsdp-sharded weights, splits matmuls on their contraction axis and
all-reduces whole activations instead of gathering the weights):
  activation_batch      rows (batch x images x tiles in the tower)     data x fsdp
  activation_length     decoder positions                              None (context parallelism:
                                                                       map it to a mesh axis)
  activation_embed      the residual stream's width                    None (replicated per shard)
  activation_heads      query heads                                    tensor
  activation_kv_heads   key / value heads (GQA)                        tensor
  activation_kv         a head's features                              None
  activation_mlp        the MLP's hidden width                         tensor
  activation_vocab      logits' vocabulary axis                        tensor
  activation_vision_*   the tower's length / embed / heads / mlp       as their decoder namesakes
Names differ from the parameter names where the mapping does: 'embed' takes fsdp on a weight,
while on an activation fsdp already holds the batch. A run's rules live in its config
(`config.sharding_rules`, DEFAULT_RULES by default) and reach the model through
`activation_sharding`, which the train and eval steps enter around their traced bodies; outside
it (a plain `model.apply`, generation) `constrain` is the identity.
"""
from __future__ import annotations

import contextlib
import contextvars
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
    # Activations (see the module docstring).
    ("activation_batch", BATCH),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_vision_length", None),
    ("activation_vision_embed", None),
    ("activation_vision_heads", "tensor"),
    ("activation_vision_mlp", "tensor"),
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


_ACTIVE = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
  """Within (at trace time): `constrain` pins activations to `mesh` by `rules`. Enter it inside
  the traced function (a jit cache does not key on it)."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active():
  """(mesh, rules) of the enclosing `activation_sharding`, or None."""
  return _ACTIVE.get()


def constrain(x, logical: Sequence):
  """nn.with_logical_constraint with spec_for's fallback (an axis that does not divide stays
  whole, as the weights do) and the mesh of `activation_sharding` (flax's wants a global mesh,
  which jax.set_mesh sets only outside jit); the identity outside it."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec_for(logical, x.shape, mesh, rules)))


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


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES, runtime=None):
  """Shardings of a VLM's full parameter tree, computed from shapes alone (nothing allocated);
  `runtime` (vlm.config.Runtime) gives the layout (scan_layers), stacked by default."""
  from vlm.model import abstract_params
  kw = {} if runtime is None else {"runtime": runtime}
  return shardings(abstract_params(config, boxed=True, **kw), mesh, rules)


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
