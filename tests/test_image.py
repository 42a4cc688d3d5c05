"""Image decoding (real files: pydicom's and scikit-image's bundled data, plus files made here) and
host-side geometry checked against HF's PIL image processors."""
import io
import os

import numpy as np
import pydicom
import pytest
import skimage.data
from PIL import Image
from pydicom.data import get_testdata_file

from data.errors import BadSample
from data.image import anyres_tiles, load_image, resize_square
from vlm.config import LLAVA16_PINPOINTS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.tiler import anyres_grid

SKIMAGE_DIR = os.path.dirname(skimage.data.__file__)


def gray_rgb(img):
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
  assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
  return img[..., 0].astype(np.float64)


def test_dicom_ct_small_min_max():
  """CT_small has no window: min-max of the modality-LUT values (HU)."""
  path = get_testdata_file("CT_small.dcm")
  img = load_image(path)
  assert img.shape == (128, 128, 3)
  raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
  want = (raw - raw.min()) / (raw.max() - raw.min()) * 255
  g = gray_rgb(img)
  assert g.min() == 0 and g.max() == 255
  assert np.abs(g - want).max() <= 0.5 + 1e-9


def test_dicom_mr_small_window():
  """MR_small carries window center 600 / width 1600: the DICOM linear VOI (PS3.3 C.11.2.1.2)."""
  path = get_testdata_file("MR_small.dcm")
  ds = pydicom.dcmread(path)
  c, w = float(ds.WindowCenter), float(ds.WindowWidth)
  x = ds.pixel_array.astype(np.float64)
  want = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255
  g = gray_rgb(load_image(os.path.basename(path), root=os.path.dirname(path)))
  assert g.shape == (64, 64)
  assert np.abs(g - want).max() <= 1.0
  assert g.min() > 0  # the window is wider than the data: no black pixel, unlike min-max


def test_dicom_voi_lut_sequence_wins_over_window():
  from pydicom.dataset import Dataset
  from pydicom.sequence import Sequence
  ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
  lut = np.minimum(4095, 8 * np.arange(1024))
  item = Dataset()
  item.add_new(0x00283002, "US", [1024, 100, 12])  # LUT Descriptor: entries, first value, bits
  item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
  ds.VOILUTSequence = Sequence([item])
  buf = io.BytesIO()
  ds.save_as(buf)
  want = lut[np.clip(ds.pixel_array.astype(int) - 100, 0, 1023)] / 4095 * 255
  assert np.abs(gray_rgb(load_image(buf.getvalue())) - want).max() <= 0.5 + 1e-9


def test_dicom_monochrome1_is_inverted():
  path = get_testdata_file("MR_small.dcm")
  ds = pydicom.dcmread(path)
  ds.PhotometricInterpretation = "MONOCHROME1"
  buf = io.BytesIO()
  ds.save_as(buf)
  inv, normal = gray_rgb(load_image(buf.getvalue())), gray_rgb(load_image(path))
  assert np.abs(inv - (255 - normal)).max() <= 1


def test_dicom_multi_frame():
  path = get_testdata_file("SC_rgb_rle_2frame.dcm")
  frames = pydicom.dcmread(path).pixel_array
  for f in (0, 1):
    np.testing.assert_array_equal(load_image(path, frame=f), frames[f])
  assert not np.array_equal(frames[0], frames[1])
  with pytest.raises(BadSample) as e:
    load_image(path, frame=2, sample_id="mf")
  assert e.value.reason == "corrupt_image" and "frame 2" in str(e.value)


@pytest.mark.parametrize("name,ref", [("retina.jpg", skimage.data.retina),
                                      ("ihc.png", skimage.data.immunohistochemistry)])
def test_skimage_rgb(name, ref):
  img = load_image(name, root=SKIMAGE_DIR)
  want = ref()
  assert img.shape == want.shape and img.dtype == np.uint8
  assert np.abs(img.astype(int) - want).max() <= 1


def test_16bit_png(tmp_path):
  x = (np.arange(40 * 30).reshape(40, 30) * 3 + 1000).astype(np.uint16)  # 1000..4597
  Image.fromarray(x).save(tmp_path / "a.png")
  assert Image.open(tmp_path / "a.png").mode.startswith("I")
  g = gray_rgb(load_image("a.png", root=tmp_path))
  assert g.shape == (40, 30) and g.min() == 0 and g.max() == 255
  np.testing.assert_array_equal(g, np.rint((x - 1000.0) / (x.max() - 1000.0) * 255))


def test_grayscale_jpeg(tmp_path):
  x = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)
  Image.fromarray(x, "L").save(tmp_path / "g.jpg", quality=95)
  g = gray_rgb(load_image("g.jpg", root=tmp_path))
  assert g.shape == (48, 64)
  assert np.abs(g - x).mean() < 2 and g[:, :4].mean() < 10 and g[:, -4:].mean() > 245


def test_bad_paths_and_files(tmp_path):
  root, outside = tmp_path / "root", tmp_path / "outside"
  root.mkdir(), outside.mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside / "x.png")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "ok.png")
  os.symlink(outside / "x.png", root / "link.png")
  os.symlink(root / "ok.png", root / "inner_link.png")
  for src in ["../outside/x.png", str(outside / "x.png"), "link.png", "sub/../../outside/x.png"]:
    with pytest.raises(BadSample) as e:
      load_image(src, root=root, sample_id="esc")
    assert e.value.reason == "path_escape" and "esc" in str(e.value), src
  assert load_image("inner_link.png", root=root).shape == (4, 4, 3)
  (root / "trunc.png").write_bytes((root / "ok.png").read_bytes()[:40])
  (root / "junk.jpg").write_bytes(b"not an image at all")
  for src, reason in [("nope.png", "missing_image"), ("trunc.png", "corrupt_image"),
                      ("junk.jpg", "corrupt_image")]:
    with pytest.raises(BadSample) as e:
      load_image(src, root=root, sample_id="id7")
    assert e.value.reason == reason and "id7" in str(e.value) and src in str(e.value)
  with pytest.raises(BadSample, match="corrupt_image"):
    load_image(get_testdata_file("MR_truncated.dcm"))


def png_claiming(width, height) -> bytes:
  """A PNG whose header claims width x height, with one row of pixel data."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width))))


def test_max_pixels_is_checked_from_the_header_before_decoding():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(buf, format="PNG")
  assert load_image(buf.getvalue(), max_pixels=1200).shape == (30, 40, 3)
  with pytest.raises(BadSample, match=r"too_large.*40x30 = 1200 pixels.*1199"):
    load_image(buf.getvalue(), max_pixels=1199)
  bomb = png_claiming(9000, 9000)   # 81 Mpx claimed (below PIL's own bomb checks), 1 row sent
  with pytest.raises(BadSample, match="too_large"):
    load_image(bomb, max_pixels=10**6)
  ct = get_testdata_file("CT_small.dcm")   # 128 x 128
  assert load_image(ct, max_pixels=128 * 128).shape == (128, 128, 3)
  with pytest.raises(BadSample, match=r"too_large.*128x128.*CT_small"):
    load_image(ct, max_pixels=128 * 128 - 1)


def test_resize_modes():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (60, 150, 3), dtype=np.uint8)
  sq = resize_square(img, 40, "squash")
  want = np.asarray(Image.fromarray(img).resize((40, 40), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(sq, want)
  # pad at the image's own long side: no resampling, so the canvas can be checked exactly.
  pad = resize_square(img, 150, "pad")
  np.testing.assert_array_equal(pad[45:105], img)
  bg = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)  # LLaVA: (122, 116, 104)
  assert bg == (122, 116, 104)
  assert (pad[:45] == bg).all() and (pad[105:] == bg).all()
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40},
                               do_rescale=False, do_normalize=False)
  for im in (img, img.transpose(1, 0, 2).copy()):
    hf = proc(images=[Image.fromarray(im)], return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(resize_square(im, 40, "center_crop"), hf.transpose(1, 2, 0))


def test_anyres_matches_hf_llava_next():
  from transformers.models.llava_next.image_processing_pil_llava_next import (
      LlavaNextImageProcessorPil)
  pinpoints = [list(p) for p in LLAVA16_PINPOINTS]
  proc = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=pinpoints)
  mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
  worst = 0.0
  for img in (skimage.data.retina()[300:700], skimage.data.immunohistochemistry()[:, 150:330]):
    tiles, hw = anyres_tiles(img, LLAVA16_PINPOINTS, 336)
    rows, cols = anyres_grid(img.shape[:2], LLAVA16_PINPOINTS, 336)
    assert tiles.shape == (1 + rows * cols, 336, 336, 3) and tiles.dtype == np.uint8
    assert hw == img.shape[:2] + (rows, cols) and rows * cols > 1
    hf = proc(images=[Image.fromarray(img)], return_tensors="np")
    assert tuple(hf["image_sizes"][0]) == hw[:2]
    ours = ((tiles / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    worst = max(worst, float(np.abs(ours - hf["pixel_values"][0]).max()))
  print(f"anyres max |ours - HF| = {worst:.2e}")
  assert worst < 1e-5
