"""What every family's flax modules share: the fields they take by keyword and remat policies.

A part module and each of its submodules is a `Part`: `cfg` (the part's config), `lora` and
`runtime` (vlm.config.Runtime), so a submodule is built as `self.child(Cls, "name")` instead of
re-declaring and passing the same fields one by one. Leaf layers (norms, vlm.lora.Dense) keep
their own few fields."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from vlm.config import LoraConfig, Runtime

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_proj": jax.checkpoint_policies.save_only_these_names(
        "q_proj", "k_proj", "v_proj", "attn_out"),
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat policy {name!r} not in {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def remat(cls, policy: str, static_argnums: tuple):
  """`cls` under the named remat policy ('none': as it is)."""
  if policy == "none":
    return cls
  return nn.remat(cls, policy=remat_policy(policy), prevent_cse=False,
                  static_argnums=static_argnums)


class Part(nn.Module):
  cfg: Any  # the part's config dataclass (LlamaConfig, VisionConfig, ...)
  lora: LoraConfig = LoraConfig()
  runtime: Runtime = Runtime()

  @property
  def dtype(self):
    return self.runtime.compute_dtype

  def child(self, cls, name: str, **kw):
    """A submodule sharing this one's cfg / lora / runtime."""
    return cls(cfg=self.cfg, lora=self.lora, runtime=self.runtime, name=name, **kw)
