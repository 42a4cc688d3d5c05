"""Image decoding and host-side geometry, all in uint8 [H, W, 3] RGB.

The host decodes (PNG, JPEG, 16-bit, grayscale, DICOM) and brings images to the model's input size;
normalization with the tower's mean/std and the S2 scale pyramid run inside the jitted model, so
4x fewer bytes travel to the device.

Intensity mapping for single-channel data (DICOM and >8-bit images):
  DICOM: modality LUT (rescale slope/intercept), then the VOI LUT or window center/width when the
  file has one, mapped linearly from the VOI's output range (a LUT: its own min..max; a window:
  pydicom's output range); otherwise min-max of the frame.
  MONOCHROME1 is inverted (low values are white). Other >8-bit images (16-bit PNG/TIFF): min-max.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from data.errors import BadSample
from vlm.config import LLAVA16_PINPOINTS, OPENAI_CLIP_MEAN, anyres_max_tiles

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


# --- paths ---------------------------------------------------------------------------------------

def resolve_path(src, root, sample_id=None) -> Path:
  """`src` relative to `root`; BadSample('path_escape') when it is absolute or, after resolving
  '..' and symlinks, lands outside the root. Without a root the path is taken as given."""
  p = Path(os.fspath(src))
  if root is None:
    return p
  if p.is_absolute():
    raise BadSample("path_escape", "absolute image path, expected one relative to the image root",
                    sample_id=sample_id, path=str(p))
  base = Path(root).resolve()
  full = (base / p).resolve()
  if not full.is_relative_to(base):
    raise BadSample("path_escape", f"image path leaves the image root {base}",
                    sample_id=sample_id, path=str(p))
  return full


# --- decoding ------------------------------------------------------------------------------------

def load_image(src: Source, *, root=None, frame: int = 0, sample_id=None,
               max_pixels: Optional[int] = None) -> np.ndarray:
  """Decode `src` (a path relative to `root`, or the file's bytes) to uint8 [H, W, 3] RGB.
  `frame` picks one frame of a multi-frame DICOM / TIFF / GIF. `max_pixels` bounds height x width,
  checked from the header before any pixel is decoded (a server's guard against huge images).
  Raises BadSample with reason 'path_escape', 'missing_image', 'corrupt_image' or 'too_large',
  naming `sample_id` and the file."""
  path = None
  if isinstance(src, (bytes, bytearray, memoryview)):
    data = bytes(src)
  else:
    path = resolve_path(src, root, sample_id)
    try:
      data = path.read_bytes()
    except (OSError, ValueError) as e:
      raise BadSample("missing_image", f"cannot read image: {e.__class__.__name__}",
                      sample_id=sample_id, path=str(path)) from None
  try:
    if data[128:132] == b"DICM" or (path is not None and path.suffix.lower() in _DICOM_SUFFIXES):
      img = _decode_dicom(data, frame, max_pixels)
    else:
      img = _decode_pil(data, frame, max_pixels)
  except _TooLarge as e:
    raise BadSample("too_large", str(e), sample_id=sample_id,
                    path=str(src) if path is not None else None) from None
  except Exception as e:  # any decoder failure: truncated, unknown format, bad DICOM, bomb, frame
    raise BadSample("corrupt_image", f"cannot decode image: {e.__class__.__name__}: "
                    f"{_no_reprs(str(e))}"[:300],
                    sample_id=sample_id, path=str(src) if path is not None else None) from None
  return img


def _no_reprs(text: str) -> str:
  """PIL names a file object by its repr (`<_io.BytesIO object at 0x...>`): say what it was."""
  return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text)


def _unit_to_rgb(u: np.ndarray) -> np.ndarray:
  g = np.rint(np.clip(u, 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.repeat(g[..., None], 3, axis=-1)


def _minmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


class _TooLarge(ValueError):
  pass


def _check_pixels(height: int, width: int, max_pixels: Optional[int]) -> None:
  if max_pixels is not None and height * width > max_pixels:
    raise _TooLarge(f"image of {width}x{height} = {height * width} pixels, more than the limit of "
                    f"{max_pixels}")


def _decode_pil(data: bytes, frame: int, max_pixels: Optional[int] = None) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    _check_pixels(im.height, im.width, max_pixels)
    if frame:
      n = getattr(im, "n_frames", 1)
      if not 0 <= frame < n:
        raise ValueError(f"frame {frame} requested, the image has {n}")
      im.seek(frame)
    im.load()
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
      return _unit_to_rgb(_minmax(np.asarray(im)))
    if im.mode == "L":
      return np.repeat(np.asarray(im)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def _voi_unit(x: np.ndarray, ds):
  """Modality values -> [0, 1] through the file's VOI LUT (preferred, as pydicom's apply_voi_lut
  does) or window center/width; None when it has neither."""
  from pydicom.pixels import apply_voi, apply_windowing

  seq = ds.get("VOILUTSequence")
  if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
    n, first = int(seq[0].LUTDescriptor[0]) or 2 ** 16, int(seq[0].LUTDescriptor[1])
    ints = lambda v: np.rint(np.clip(v, first, first + n - 1)).astype(np.int64)
    y = apply_voi(ints(x), ds).astype(np.float64)
    lut = apply_voi(np.arange(first, first + n), ds)  # the LUT's own output range
    lo, hi = float(lut.min()), float(lut.max())
  elif "WindowCenter" in ds and "WindowWidth" in ds:
    y = apply_windowing(x, ds)
    # The window's output range is where it sends the most extreme inputs.
    lo, hi = sorted(float(v) for v in apply_windowing(np.array([-1e15, 1e15]), ds))
  else:
    return None
  return (np.asarray(y, np.float64) - lo) / max(hi - lo, 1e-12)


def _decode_dicom(data: bytes, frame: int, max_pixels: Optional[int] = None) -> np.ndarray:
  import pydicom
  from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

  ds = pydicom.dcmread(io.BytesIO(data), force=True)
  _check_pixels(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), max_pixels)
  n = int(ds.get("NumberOfFrames", 1) or 1)
  if not 0 <= frame < n:
    raise ValueError(f"frame {frame} requested, the DICOM has {n}")
  arr = pixel_array(ds, index=frame) if n > 1 else ds.pixel_array
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  if photometric in ("MONOCHROME1", "MONOCHROME2"):
    x = apply_modality_lut(arr, ds).astype(np.float64)
    u = _voi_unit(x, ds)
    u = _minmax(x) if u is None else u
    return _unit_to_rgb(1.0 - u if photometric == "MONOCHROME1" else u)
  if photometric == "PALETTE COLOR":
    arr = apply_color_lut(arr, ds)
    bits = 8 if arr.dtype == np.uint8 else 16
  else:  # RGB; YBR is converted to RGB by pydicom's decoders
    bits = int(ds.get("BitsStored", 8))
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"unsupported DICOM pixel layout {arr.shape} ({photometric})")
  if bits > 8:
    return np.rint(arr.astype(np.float64) * (255.0 / (2 ** bits - 1))).astype(np.uint8)
  return arr.astype(np.uint8)


# --- geometry ------------------------------------------------------------------------------------

def pad_colour(mean: Sequence[float] = OPENAI_CLIP_MEAN) -> tuple:
  """Background of LLaVA's expand2square: tuple(int(x * 255) for x in image_mean)."""
  return tuple(int(m * 255) for m in mean)


def expand_to_square(img: np.ndarray, colour: Sequence[int]) -> np.ndarray:
  """LLaVA's expand2square: centre the image on a square canvas of `colour` (offset rounds down)."""
  h, w = img.shape[:2]
  if h == w:
    return img
  s = max(h, w)
  out = np.empty((s, s, 3), np.uint8)
  out[...] = np.asarray(colour, np.uint8)
  y, x = (s - h) // 2, (s - w) // 2
  out[y:y + h, x:x + w] = img
  return out


def _resize(img: np.ndarray, hw: tuple) -> np.ndarray:
  if img.shape[:2] == tuple(hw):
    return img
  return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def resize_square(img: np.ndarray, size: int, mode: str = "squash", *,
                  mean: Sequence[float] = OPENAI_CLIP_MEAN) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], bicubic (PIL).
  squash: resize ignoring aspect; center_crop: shortest edge to `size` then a centred crop (as HF
  CLIPImageProcessor); pad: LLaVA's expand2square with the tower's mean colour, then resize."""
  if mode == "squash":
    return _resize(img, (size, size))
  if mode == "pad":
    return _resize(expand_to_square(img, pad_colour(mean)), (size, size))
  if mode == "center_crop":
    h, w = img.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    img = _resize(img, (size, new_long) if h <= w else (new_long, size))
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]
  raise ValueError(f"resize mode {mode!r}: choose squash | center_crop | pad")


def anyres_tiles(img: np.ndarray, pinpoints, tile: int) -> tuple:
  """LLaVA-1.6 anyres, as HF LlavaNextImageProcessor: -> (uint8 [1 + rows*cols, tile, tile, 3],
  (height, width, rows, cols): the original's size and the grid, the model's `image_sizes` row).
  Tile 0 is the whole image squashed to tile x tile; the rest are row-major tiles of the image
  resized (keeping aspect) to fit the best pinpoint resolution and centred on a black canvas of
  that resolution. The grid is decided here, on the host, in HF's float arithmetic."""
  from vlm.tiler import select_best_resolution  # lazy: keeps jax out of data workers' start-up

  h, w = img.shape[:2]
  th, tw = select_best_resolution((h, w), pinpoints)
  # HF get_patch_output_size, float arithmetic kept as is so the sizes agree exactly.
  scale_w, scale_h = tw / w, th / h
  if scale_w < scale_h:
    nh, nw = min(math.ceil(h * scale_w), th), tw
  else:
    nh, nw = th, min(math.ceil(w * scale_h), tw)
  canvas = np.zeros((th, tw, 3), np.uint8)
  y, x = (th - nh) // 2, (tw - nw) // 2
  canvas[y:y + nh, x:x + nw] = _resize(img, (nh, nw))
  rows, cols = th // tile, tw // tile
  tiles = canvas[:rows * tile, :cols * tile].reshape(rows, tile, cols, tile, 3)
  tiles = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile, tile, 3)
  return np.concatenate([_resize(img, (tile, tile))[None], tiles]), (h, w, rows, cols)


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
  """What the host makes of one image for the model: the values of the model's TilerConfig and
  VisionConfig that training (data/pipeline.py) and inference (serve/prompt.py) both need, derived
  in one place (`of`). The defaults are Llama3-Med's (S2 DFN5B at 378/756/1134, pad to square)."""
  tiler: str = "s2"            # s2 | single (square image) | anyres (LLaVA-1.6 tiles)
  image_size: int = 1134       # side of each square shipped: the image (S2: the largest scale), or
                               # anyres: each tile (the tower's size)
  resize_mode: str = "pad"     # squash | center_crop | pad (pad-to-square, mean colour)
  mean: tuple = OPENAI_CLIP_MEAN   # the tower's mean: pad mode's fill colour
  pinpoints: tuple = LLAVA16_PINPOINTS   # anyres: (height, width) resolutions
  patch_size: int = 14         # anyres: image_size / patch_size = feature grid side per tile
  image_tokens: int = 729      # placeholders per image (square tilers; anyres: `tokens`)

  @classmethod
  def of(cls, config) -> "ImageGeometry":
    """The geometry of a vlm.config.VLMConfig with a vision tower."""
    v, t = config.vision, config.tiler
    if v is None:
      raise ValueError("this model has no vision tower; it cannot take an image")
    return cls(tiler=t.kind, image_size=t.input_size(v), resize_mode=t.resize_mode,
               mean=tuple(v.mean), pinpoints=tuple(tuple(p) for p in t.grid_pinpoints),
               patch_size=v.patch_size,
               image_tokens=0 if t.kind == "anyres" else config.image_tokens())

  @property
  def max_tiles(self) -> int:
    """anyres: tiles per image shipped (zero tiles pad past an image's own)."""
    return anyres_max_tiles(self.pinpoints, self.image_size)

  def tokens(self, image_hw: tuple) -> int:
    """Placeholder ids for an image of (height, width) (anyres: they depend on it)."""
    if self.tiler != "anyres":
      return self.image_tokens
    from vlm.tiler import anyres_num_features   # lazy: imports jax
    return anyres_num_features(image_hw, self.pinpoints, self.image_size, self.patch_size)


def model_pixels(img: np.ndarray, geometry: ImageGeometry) -> tuple:
  """One image as the model takes it (training and inference share this):
  square tilers -> (uint8 [size, size, 3], None); anyres -> (uint8 [max_tiles, tile, tile, 3]
  zero-padded past the image's tiles, (height, width, grid rows, grid cols))."""
  g = geometry
  if g.tiler == "anyres":
    tiles, hw = anyres_tiles(img, g.pinpoints, g.image_size)
    out = np.zeros((g.max_tiles,) + tiles.shape[1:], np.uint8)
    out[:len(tiles)] = tiles
    return out, hw
  return resize_square(img, g.image_size, g.resize_mode, mean=g.mean), None
