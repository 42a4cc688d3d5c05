"""CLIP ViT vision tower (HF CLIPVisionModel and open_clip VisionTransformer numerics).

Both weight conventions map onto one parameter tree (convert/ does the renaming and splits open_clip's
fused in_proj). The tower returns the hidden state HF calls `hidden_states[select_layer]` (before
`post_layernorm`), CLS dropped unless `keep_cls`. Layers past the selected one are kept in the tree
(round trips, exports) but skipped at run time with `nn.cond`, so LLaVA's layer -2 costs L-1 layers.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlm.attention import attend
from vlm.families.module import Part, remat
from vlm.lora import Dense
from vlm.sharding import constrain

# Logical layouts of the tower's activations (vlm/sharding.py maps them to the mesh).
TOKENS = ("activation_batch", "activation_vision_length", "activation_vision_embed")
HEADS = ("activation_batch", "activation_vision_length", "activation_vision_heads", "activation_kv")


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


class LayerNorm(nn.Module):
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                       jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                      jnp.float32)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


class VisionBlock(Part):
  @nn.compact
  def __call__(self, x, deterministic):
    c = self.cfg
    n, t, _ = x.shape
    hd = c.width // c.heads

    def dense(name, features, axes):
      rank = self.lora.rank if name in self.lora.vision_targets else 0
      return Dense(features, axes, use_bias=True, dtype=self.dtype, lora_rank=rank,
                   lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout, name=name)

    x = constrain(x, TOKENS)
    h = LayerNorm(c.norm_eps, self.dtype, name="ln1")(x)
    # Named as in the decoder, so a named remat policy (save_attn_proj) keeps them on the tower too.
    q, k, v = (checkpoint_name(constrain(dense(nm, c.width, ("vision_embed", "vision_heads"))(
        h, deterministic).reshape(n, t, c.heads, hd), HEADS), f"{nm}_proj") for nm in ("q", "k", "v"))
    o = attend(q, k, v, causal=False, impl=self.runtime.attention)
    o = checkpoint_name(constrain(o, HEADS).reshape(n, t, c.width), "attn_out")
    x = x + dense("o", c.width, ("vision_heads", "vision_embed"))(o, deterministic)
    x = constrain(x, TOKENS)
    h = LayerNorm(c.norm_eps, self.dtype, name="ln2")(x)
    h = ACTIVATIONS[c.act](dense("fc1", c.mlp_dim, ("vision_embed", "vision_mlp"))(h, deterministic))
    h = constrain(h, ("activation_batch", "activation_vision_length", "activation_vision_mlp"))
    return x + dense("fc2", c.width, ("vision_mlp", "vision_embed"))(h, deterministic)


class _VisionScanBody(Part):
  @nn.compact
  def __call__(self, carry, _, deterministic):
    x, i = carry
    # the tower's own policy (runtime.vision_remat; MaxText: remat_policy_for_vit)
    block = self.child(remat(VisionBlock, self.runtime.vision_remat, static_argnums=(2,)), "block")
    if self.is_initializing():  # create every layer's params; nn.cond cannot create them
      x = block(x, deterministic)
    else:
      x = nn.cond(i < self.cfg.layers_used, lambda mdl, y: mdl(y, deterministic), lambda mdl, y: y,
                  block, x)
    return (x, i + 1), None


class VisionTower(Part):
  """pixels [N, H, W, 3] (normalized float) -> [N, tokens, width] selected hidden states."""

  @nn.compact
  def __call__(self, pixels, deterministic: bool = True):
    c = self.cfg
    p, g = c.patch_size, c.grid
    n = pixels.shape[0]
    if pixels.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"vision tower expects {c.image_size}px tiles, got {pixels.shape}")
    # Conv with stride = kernel = patch, written as a matmul over flattened patches.
    w = self.param("patch_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, None, None, "vision_embed")),
                   (p, p, 3, c.width), jnp.float32)
    x = pixels.astype(self.dtype).reshape(n, g, p, g, p, 3)
    x = jnp.einsum("nhpwqc,pqcd->nhwd", x, w.astype(self.dtype)).reshape(n, g * g, c.width)
    cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                         ("vision_embed",)), (c.width,), jnp.float32)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               (None, "vision_embed")),
                     (g * g + 1, c.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c.width)), x], axis=1)
    x = x + pos.astype(self.dtype)
    x = LayerNorm(c.norm_eps, self.dtype, name="ln_pre")(x)
    x = constrain(x, TOKENS)
    stack = nn.scan(_VisionScanBody, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=(0, nn.broadcast),
                    length=c.layers, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, _), _ = stack(cfg=c, lora=self.lora, runtime=self.runtime, name="layers")(
        (x, jnp.int32(0)), None, deterministic)
    x = constrain(x, TOKENS)
    if self.is_initializing():  # create post-LN params for round trips; unused for features
      LayerNorm(c.norm_eps, self.dtype, name="ln_post")(x[:, :1])
    return x if c.keep_cls else x[:, 1:]
