"""Image tilers: S2 multi-scale (Llama3-Med) and LLaVA-1.6 anyres.

Host side (numpy, shared by the data pipeline and the prompt path so placeholder counts and tile
grids agree by construction): `best_pinpoint`, `select_best_resolution`, `anyres_grid`,
`anyres_image_sizes`, `anyres_unpad_box`, `anyres_num_features`.
Device side (jitted, inside the model): `torch_bicubic_matrix`, `s2_features`, `anyres_pack`.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np


# --- anyres geometry: decided on the host --------------------------------------------------------

def best_pinpoint(image_hw, pinpoints) -> np.ndarray:
  """Index into `pinpoints` of LLaVA-1.6's best resolution for images of (height, width) [..., 2]:
  most image pixels kept, then least waste, first on ties.

  Computed as HF's and LLaVA's select_best_resolution do, in float64 (Python floats):
  scale = min(w / ow, h / oh), kept = int(ow * scale) * int(oh * scale). Float rounding makes
  int(ow * (w / ow)) fall one pixel short for some sides, and near 1:2 or 2:1 (567x1133, 600x1199)
  that flips the choice; placeholder counts agree either way, so only an exact copy of the float
  rule reads the tiles a checkpoint was trained on. The device has no float64: the grid is chosen
  here and shipped to the model in `image_sizes` (`anyres_image_sizes`)."""
  hw = np.asarray(image_hw, np.int64)
  oh, ow = hw[..., 0:1].astype(np.float64), hw[..., 1:2].astype(np.float64)
  ph = np.asarray([h for h, _ in pinpoints], np.float64)
  pw = np.asarray([w for _, w in pinpoints], np.float64)
  scale = np.minimum(pw / ow, ph / oh)
  kept = np.trunc(ow * scale).astype(np.int64) * np.trunc(oh * scale).astype(np.int64)
  kept = np.minimum(kept, hw[..., 0:1] * hw[..., 1:2])
  waste = ph.astype(np.int64) * pw.astype(np.int64) - kept
  best = kept == kept.max(-1, keepdims=True)
  return np.argmin(np.where(best, waste, np.iinfo(np.int64).max), axis=-1)


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple:
  """LLaVA-1.6: the (height, width) pinpoint for an image of (height, width)."""
  i = int(best_pinpoint(image_hw[:2], pinpoints))
  return int(pinpoints[i][0]), int(pinpoints[i][1])


def anyres_grid(image_hw, pinpoints, tile: int) -> tuple:
  """(rows, cols) of tiles for an image of (height, width)."""
  h, w = select_best_resolution(image_hw, pinpoints)
  return h // tile, w // tile


def anyres_image_sizes(image_hw, pinpoints, tile: int) -> np.ndarray:
  """(height, width) [..., 2] -> the model's `image_sizes` int32 [..., 4]: (height, width, grid
  rows, grid cols), the grid chosen here in float64 (`best_pinpoint`)."""
  hw = np.asarray(image_hw, np.int64)
  grid = np.asarray([(h // tile, w // tile) for h, w in pinpoints], np.int64)
  return np.concatenate([hw, grid[best_pinpoint(hw, pinpoints)]], -1).astype(np.int32)


def anyres_unpad_box(image_hw, grid_hw, side: int) -> tuple:
  """Rows [r0, r1) and columns [c0, c1) of the stitched (rows*side, cols*side) feature map that
  HF's `unpad_image` keeps. HF computes int(round(x, 7)) in floats; for integer sizes that equals
  exact floor division (a fraction p/q with q < 1e4 is never within 5e-8 of the next integer)."""
  oh, ow = int(image_hw[0]), int(image_hw[1])
  ch, cw = grid_hw[0] * side, grid_hw[1] * side
  if ow * ch > cw * oh:  # original is wider than the canvas: padding was added top and bottom
    pad = (ch - (oh * cw) // ow) // 2
    return pad, ch - pad, 0, cw
  pad = (cw - (ow * ch) // oh) // 2
  return 0, ch, pad, cw - pad


def anyres_num_features(image_hw, pinpoints, tile: int, patch: int) -> int:
  """Placeholder ids one anyres image expands to: base tile + unpadded grid + one newline per row
  (image_hw: (height, width) or an `image_sizes` row; tile: the tower's input side in px; patch:
  its patch size)."""
  side = tile // patch
  grid = anyres_grid(image_hw[:2], pinpoints, tile)
  r0, r1, c0, c1 = anyres_unpad_box(image_hw, grid, side)
  return side * side + (r1 - r0) * (c1 - c0 + 1)


# --- device side --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 matrix equal to torch F.interpolate(mode='bicubic', align_corners=False,
  antialias=False) along one axis: Keys cubic with A=-0.75, half-pixel centres, clamped borders.
  S2 (s2wrapper) resizes this way; a matmul is also the fast form on GPU/TPU."""
  a = -0.75
  scale = n_in / n_out
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    x0 = int(np.floor(src))
    t = src - x0
    w = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
         ((a + 2) * t - (a + 3)) * t * t + 1,
         ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
         ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    for k in range(4):
      m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += w[k]
  return m.astype(np.float32)


def bicubic_resize(x, size: int):
  """x [N, H, W, C] float -> [N, size, size, C], float32 matmuls (torch bicubic numerics)."""
  mh = jnp.asarray(torch_bicubic_matrix(x.shape[1], size))
  mw = jnp.asarray(torch_bicubic_matrix(x.shape[2], size))
  x = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=hp)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=hp)


def s2_features(encode: Callable, pixels, scales: Sequence[int], tile: int, grid: int):
  """S2 multi-scale features: pixels [N, S, S, 3] normalized at the largest scale ->
  [N, grid*grid, C * len(scales)], scales concatenated on channels in ascending order.

  Every scale is cut into (s/tile)^2 row-major tiles and all tiles of all scales go through the
  tower in ONE batched call; each scale's stitched (k*grid)^2 map is area-pooled back to grid^2."""
  n, size = pixels.shape[0], pixels.shape[1]
  pieces, ks = [], []
  for s in scales:
    if s % tile:
      raise ValueError(f"S2 scale {s} is not a multiple of the tower's {tile}px input")
    xs = pixels if s == size else bicubic_resize(pixels, s)
    k = s // tile
    ks.append(k)
    pieces.append(einops.rearrange(xs.astype(pixels.dtype), "n (i h) (j w) c -> n (i j) h w c",
                                   i=k, j=k))
  # Sample-major tile order keeps the batch sharding: each device encodes its own samples' tiles.
  tiles = jnp.concatenate(pieces, axis=1)  # [N, sum(k^2), tile, tile, 3]
  feats = encode(tiles.reshape((-1,) + tiles.shape[2:]))
  feats = feats.reshape(n, tiles.shape[1], *feats.shape[1:])  # [N, sum(k^2), grid^2, C]
  outs, off = [], 0
  for k in ks:
    f = feats[:, off:off + k * k]
    off += k * k
    f = einops.rearrange(f, "n (i j) (h w) c -> n (i h) (j w) c", i=k, j=k, h=grid)
    f = f.astype(jnp.float32).reshape(n, grid, k, grid, k, -1).mean(axis=(2, 4))
    outs.append(f.reshape(n, grid * grid, -1).astype(feats.dtype))
  return jnp.concatenate(outs, axis=-1)


def model_image_sizes(image_sizes, pinpoints, tile: int):
  """The model's `image_sizes` [..., 4] (height, width, rows, cols). A HF-style [..., 2] (height,
  width) is completed here while it is concrete (an eager call, or a constant closed over); a
  traced one cannot be: the grid is a float64 decision the device cannot make."""
  if isinstance(image_sizes, jax.core.Tracer):
    if image_sizes.shape[-1] != 4:
      raise ValueError("anyres under jit needs image_sizes [..., 4] (height, width, rows, cols) "
                       "made on the host by vlm.tiler.anyres_image_sizes, not "
                       f"{tuple(image_sizes.shape)}")
    return image_sizes
  sizes = np.asarray(image_sizes)
  return sizes if sizes.shape[-1] == 4 else anyres_image_sizes(sizes, pinpoints, tile)


def anyres_pack(feats, image_sizes, newline, pinpoints, tile: int, side: int):
  """LLaVA-1.6 packing inside jit with static shapes.

  feats [N, T, side*side, D] per tile (tile 0 = squashed base image, then the grid row-major,
  zero-padded up to T); image_sizes [N, 4] (height, width, grid rows, grid cols: the host's choice,
  `anyres_image_sizes`). Returns (seq [N, F, D], count [N]): base tokens, then the stitched grid
  map with HF's unpadding (integer arithmetic, `anyres_unpad_box`), a `newline` vector after each
  row; entries past `count` are zeros."""
  n, t, _, d = feats.shape
  image_sizes = jnp.asarray(image_sizes).astype(jnp.int32)
  oh, ow = image_sizes[:, 0], image_sizes[:, 1]
  gh, gw = image_sizes[:, 2, None, None], image_sizes[:, 3, None, None]
  ch, cw = gh * side, gw * side
  oh, ow = oh[:, None, None], ow[:, None, None]
  wider = ow * ch > cw * oh
  pad_h = (ch - (oh * cw) // ow) // 2
  pad_w = (cw - (ow * ch) // oh) // 2
  r0, r1 = jnp.where(wider, pad_h, 0), jnp.where(wider, ch - pad_h, ch)
  c0, c1 = jnp.where(wider, 0, pad_w), jnp.where(wider, cw, cw - pad_w)
  rows = side * max(h // tile for h, _ in pinpoints)
  cols = side * max(w // tile for _, w in pinpoints)
  r = jnp.arange(rows)[None, :, None]
  c = jnp.arange(cols + 1)[None, None, :]
  is_nl = c == cols
  in_rows = (r >= r0) & (r < r1)
  valid = in_rows & ((is_nl) | ((c >= c0) & (c < c1)))
  tile_idx = jnp.clip(1 + (r // side) * gw + jnp.minimum(c, cols - 1) // side, 0, t - 1)
  tok = (r % side) * side + jnp.minimum(c, cols - 1) % side
  tok = jnp.broadcast_to(tok, tile_idx.shape)
  vals = feats[jnp.arange(n)[:, None, None], tile_idx, tok]  # [N, rows, cols+1, D]
  vals = jnp.where(is_nl[..., None], newline.astype(vals.dtype), vals)
  vals, valid = vals.reshape(n, -1, d), valid.reshape(n, -1)
  dest = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, valid.shape[1])
  packed = jnp.zeros_like(vals).at[jnp.arange(n)[:, None], dest].set(vals, mode="drop")
  seq = jnp.concatenate([feats[:, 0], packed], axis=1)
  return seq, side * side + valid.sum(axis=1)
