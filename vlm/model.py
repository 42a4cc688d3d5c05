"""The VLM: vision tower -> tiler -> connector -> features written at `<image>` slots -> decoder.

`model.apply({"params": params}, input_ids, pixel_values=None, ...)` -> float32 logits [B, T, V].
Every image slot in `input_ids` is already expanded to as many `image_token_id`s as that image yields
features; the k-th placeholder of a row receives the k-th feature of that row's images, in order.
"""
from __future__ import annotations


import flax.linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp

from vlm import families, tiler
from vlm.config import Runtime, VLMConfig
from vlm.connector import Connector


def normalize_pixels(pixels, mean, std):
  """uint8 pixels are scaled and normalized here, on the accelerator (4x fewer bytes shipped);
  float pixels are taken as already normalized (what HF processors produce)."""
  if pixels.dtype == jnp.uint8:
    x = pixels.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return pixels.astype(jnp.float32)


def merge_image_features(embeds, is_image, feats, counts, first=0):
  """Write features into placeholder slots. embeds [B, T, D]; is_image [B, T]; feats [B, n, F, D];
  counts [B, n] valid features per image. Slot k of a row takes feature k of the row's images
  concatenated (image i's first `counts[i]` rows); `first`: placeholders before this chunk of the
  row (a prompt prefilled in chunks)."""
  n, f = feats.shape[1:3]
  ordinal = jnp.cumsum(is_image, axis=1) - 1 + first
  ends = jnp.cumsum(counts, axis=1)  # [B, n]
  img = jnp.clip((ordinal[:, :, None] >= ends[:, None, :]).sum(-1), 0, n - 1)
  start = jnp.take_along_axis(ends - counts, img, axis=1)
  pos = jnp.clip(ordinal - start, 0, f - 1)
  # Per row (vmap: a gather with a batch dimension), so a batch-sharded row reads only its own
  # images; indexing with arange(B) is a general gather that XLA serves by all-gathering `feats`.
  picked = jax.vmap(lambda row, i, p: row[i, p])(feats, img, pos)
  return jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)


class VLM(nn.Module):
  config: VLMConfig  # what the network is (saved)
  runtime: Runtime = Runtime()  # how it runs (dtype, remat, attention, layer layout; not saved)

  def setup(self):
    c, r = self.config, self.runtime
    # the decoder and the tower are their families' modules (vlm/families), built by keyword
    llm = families.of("llm", c.llm).module_class()
    self.llm = llm(cfg=c.llm, lora=c.lora, runtime=r, name="llm")
    if c.vision is not None:
      tower = families.of("vision", c.vision).module_class()
      self.vision = tower(cfg=c.vision, lora=c.lora, runtime=r, name="vision")
      self.connector = Connector(c.connector.kind, c.llm.hidden, r.compute_dtype,
                                 name="connector")
      if c.tiler.kind == "anyres":
        self.image_newline = self.param(
            "image_newline", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (c.llm.hidden,), jnp.float32)

  def encode_images(self, pixel_values, image_sizes=None, deterministic=True):
    """pixel_values [B, n, S, S, 3] (single / S2) or [B, n, tiles, h, w, 3] (anyres) ->
    (features [B, n, F, D] in the LLM's width, counts [B, n])."""
    c = self.config
    v = c.vision
    x = normalize_pixels(pixel_values, v.mean, v.std)
    b, n = x.shape[:2]
    encode = lambda t: self.vision(t.astype(self.runtime.compute_dtype), deterministic)
    if c.tiler.kind == "anyres":
      if image_sizes is None:
        raise ValueError("anyres models need image_sizes [B, n_images, 4] (height, width, grid "
                         "rows, grid cols)")
      sizes = tiler.model_image_sizes(image_sizes, c.tiler.grid_pinpoints, v.image_size)
      t = x.shape[2]
      f = self.connector(encode(x.reshape((b * n * t,) + x.shape[3:])))
      f = f.reshape(b * n, t, f.shape[1], f.shape[2])
      seq, counts = tiler.anyres_pack(f, jnp.reshape(sizes, (b * n, 4)), self.image_newline,
                                      c.tiler.grid_pinpoints, v.image_size, v.grid)
      return seq.reshape(b, n, *seq.shape[1:]), counts.reshape(b, n)
    x = x.reshape((b * n,) + x.shape[2:])
    if c.tiler.kind == "s2":
      f = tiler.s2_features(encode, x, c.tiler.scales, v.image_size, v.grid)
    elif c.tiler.kind == "single":
      f = encode(x)
    else:
      raise ValueError(f"unknown tiler {c.tiler.kind!r}")
    f = self.connector(f)
    f = f.reshape(b, n, *f.shape[1:])
    return f, jnp.full((b, n), f.shape[2], jnp.int32)

  def embed(self, input_ids, pixel_values=None, image_sizes=None, deterministic=True):
    h = self.llm.embed(input_ids)
    if pixel_values is None:
      return h
    if self.config.vision is None:
      raise ValueError("this model has no vision tower but pixel_values were given")
    feats, counts = self.encode_images(pixel_values, image_sizes, deterministic)
    return merge_image_features(h, input_ids == self.config.image_token_id, feats, counts)

  def __call__(self, input_ids, pixel_values=None, *, image_sizes=None, positions=None,
               segment_ids=None, deterministic: bool = True, cache=None, return_hidden=False):
    if self.is_initializing() and self.config.vision is not None and pixel_values is None:
      pixel_values = self._dummy_pixels(input_ids.shape[0])
      s = self.config.vision.image_size  # a one-tile grid: init needs only the shapes
      image_sizes = jnp.tile(jnp.int32([s, s, 1, 1]), (input_ids.shape[0], 1, 1))
    h = self.embed(input_ids, pixel_values, image_sizes, deterministic)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return self.llm(h, positions, segment_ids, cache, deterministic, return_hidden)

  def logits(self, hidden):
    return self.llm.logits(hidden)

  def _dummy_pixels(self, b):
    c = self.config
    if c.tiler.kind == "anyres":
      t = c.tiler.max_tiles(c.vision)
      return jnp.zeros((b, 1, t, c.vision.image_size, c.vision.image_size, 3), jnp.uint8)
    s = c.tiler.input_size(c.vision)
    return jnp.zeros((b, 1, s, s, 3), jnp.uint8)


def init_params(config: VLMConfig, rng, *, seq_len: int = 8, boxed: bool = False,
                runtime: Runtime = Runtime()):
  """Initialize (vision included) without a real batch. boxed=True keeps the logical-axis boxes;
  `runtime.scan_layers` picks the layout (stacked by default, as checkpoints hold it)."""
  model = VLM(config, runtime)
  ids = jnp.zeros((1, seq_len), jnp.int32)

  @jax.jit  # one compiled program instead of thousands of eager ops
  def init(key):
    params = model.init({"params": key, "dropout": key}, ids)["params"]
    return params if boxed else nn.unbox(params)
  return init(rng)


def abstract_params(config: VLMConfig, *, boxed: bool = True, runtime: Runtime = Runtime()):
  """Shapes/dtypes (and logical axes) of the full parameter tree without allocating it."""
  return jax.eval_shape(lambda k: init_params(config, k, boxed=boxed, runtime=runtime),
                        jax.random.key(0))


def unstack_layers(params):
  """Stacked decoder params (llm/layers/... with a leading layer axis) -> one subtree per layer
  (llm/layers_0/..., the scan_layers=False layout). Device arrays are copied; the stacked ones
  are freed only when the caller drops them."""
  llm = dict(params["llm"])
  flat = flatten_dict(llm.pop("layers"))
  layers = next(iter(flat.values())).shape[0]
  for i in range(layers):
    llm[f"layers_{i}"] = unflatten_dict({path: x[i] for path, x in flat.items()})
  return dict(params, llm=llm)
