"""LLaVA-1.6 anyres geometry against transformers: the grid pinpoint for every image size (HF's
select_best_resolution in Python floats is the spec), placeholder counts, and the host pipeline's
pixels and the model's logits beside LlavaNext's on a size where float rounding picks the grid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import transformers as T
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

import vlm
from tests import hf_models as H
from vlm import tiler
from vlm.config import LLAVA16_PINPOINTS
from serve.prompt import image_inputs

SIDE = 1400
# LLaVA-NeXT's other grid in use (llava-onevision / LLaVA-Video "anyres_max_9"): 384 px tiles
# from 1x1 to 6x6, so every aspect ratio i:j up to 6 is a decision boundary.
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
PINPOINT_SETS = {"llava16": LLAVA16_PINPOINTS, "onevision": ONEVISION_PINPOINTS}


def _near_boundaries(pinpoints, px=2):
  """Sizes within `px` pixels of a pinpoint's aspect ratio: where two candidates keep the same
  pixels up to one and float rounding of int(side * scale) decides (567x1133, 600x1199: the 36
  sizes up to 1400 px where exact arithmetic picks another LLaVA-1.6 grid all lie within 2 px)."""
  h = np.arange(1, SIDE + 1)[:, None]
  w = np.arange(1, SIDE + 1)[None, :]
  near = np.zeros((SIDE, SIDE), bool)
  for ph, pw in set(pinpoints):
    near |= np.abs(w * ph - h * pw) <= px * max(ph, pw)
  return np.argwhere(near) + 1


def _differences(pinpoints, sizes):
  """Sizes [n, 2] where our host decision differs from HF's select_best_resolution."""
  pins, as_hf = [tuple(p) for p in pinpoints], [list(p) for p in pinpoints]
  ours = tiler.best_pinpoint(sizes, pinpoints).tolist()
  return [(h, w) for (h, w), i in zip(np.asarray(sizes).tolist(), ours)
          if hf_select((h, w), as_hf) != pins[i]]


@pytest.mark.parametrize("name", ["llava16", "onevision"])
def test_best_pinpoint_matches_hf_near_boundaries(name):
  """Default run: HF's loop on the sizes near a decision boundary (LLaVA-1.6: all of them; the
  36-pinpoint set: a sample) and on a random sample of the rest; the full sweep is slow."""
  pins = PINPOINT_SETS[name]
  rng = np.random.default_rng(0)
  near = _near_boundaries(pins)
  if name == "onevision":
    near = near[rng.choice(len(near), 8000, replace=False)]
  sample = rng.integers(1, SIDE + 1, size=(20000 if name == "llava16" else 4000, 2))
  edges = [(567, 1133), (600, 1199), (1133, 567), (1199, 600), (1, 1400), (1400, 1), (1, 1)]
  assert _differences(pins, np.concatenate([near, sample, edges])) == []
  if name == "llava16":  # and the placeholder counts built on the grid match LlavaNextProcessor's
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # the count needs no tokenizer
    proc.image_processor = type("P", (), {"image_grid_pinpoints": [list(p) for p in pins]})()
    proc.patch_size, proc.num_additional_image_tokens = 14, 0
    sizes = np.concatenate([near[rng.choice(len(near), 1500, replace=False)], sample[:1500], edges])
    assert [(h, w) for h, w in sizes.tolist() if tiler.anyres_num_features((h, w), pins, 336, 14)
            != proc._get_number_of_features(h, w, 336, 336)] == []


@pytest.mark.slow  # HF's Python loop over 1.96M sizes: 10-20 s (5 pinpoints), 60-90 s (36)
@pytest.mark.parametrize("name", ["llava16", "onevision"])
def test_best_pinpoint_matches_hf_every_size(name):
  pins = PINPOINT_SETS[name]
  side = np.arange(1, SIDE + 1)
  diffs = []
  for rows in np.array_split(side, 14):  # bounded host memory: [100, 1400, pinpoints] at a time
    hw = np.stack(np.meshgrid(rows, side, indexing="ij"), -1).reshape(-1, 2)
    diffs += _differences(pins, hw)
  print(f"{name}: {SIDE}x{SIDE} sizes, {len(diffs)} differences from HF")
  assert diffs == []


def test_jit_needs_the_host_grid():
  """Under jit a (height, width)-only image_sizes cannot be completed (no float64 on device)."""
  cfg = vlm.preset("llava16_vicuna_13b")
  with pytest.raises(ValueError, match="rows, cols"):
    jax.jit(lambda s: tiler.model_image_sizes(s, cfg.tiler.grid_pinpoints, 336))(
        jnp.zeros((1, 2), jnp.int32))
  eager = tiler.model_image_sizes(np.asarray([[567, 1133]]), cfg.tiler.grid_pinpoints, 336)
  np.testing.assert_array_equal(eager, [[567, 1133, 1, 2]])


def test_pipeline_pixels_and_logits_match_llava_next_567x1133(tmp_path):
  """567x1133: exact arithmetic picks 672x672 (2x2 tiles), HF's floats 336x672 (1x2); both give
  the same placeholder count, so only pixels and logits show the difference."""
  from transformers.models.llava_next.image_processing_pil_llava_next import (
      LlavaNextImageProcessorPil)
  img = skimage.data.retina()[:567, :1133]
  img_id = 95
  cfg = T.LlavaNextConfig(vision_config=H.clip_config(image_size=336),
                          text_config=H.llama_config(max_position_embeddings=2048),
                          image_token_index=img_id,
                          image_grid_pinpoints=[list(p) for p in LLAVA16_PINPOINTS])
  ref = H.build(T.LlavaNextForConditionalGeneration, cfg, tmp_path)
  model, params = vlm.from_pretrained(str(tmp_path))
  v = model.config.vision
  pixels, size, n = image_inputs(model.config, img)  # the host path of chat / eval / training
  proc = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=[list(p) for p in LLAVA16_PINPOINTS],
                                    image_mean=list(v.mean), image_std=list(v.std))
  hf = proc(images=[Image.fromarray(img)], return_tensors="np")
  want_px = hf["pixel_values"][0]
  assert tuple(hf["image_sizes"][0]) == tuple(size[:2]) == (567, 1133)
  norm = ((pixels / 255.0 - np.asarray(v.mean)) / np.asarray(v.std)).transpose(0, 3, 1, 2)
  real = int(pixels.reshape(len(pixels), -1).any(axis=1).sum())
  px_err = float(np.abs(norm[:len(want_px)] - want_px).max())
  print(f"567x1133: tiles ours {real}, HF {len(want_px)}; pixels max |ours - HF| = {px_err:.2e}")
  assert real == len(want_px) == 3 and px_err < 1e-5

  rng = np.random.default_rng(2)
  ids = np.concatenate([H.rand_ids(rng, (3,), 96, avoid=(img_id,)), np.full(n, img_id),
                        H.rand_ids(rng, (5,), 96, avoid=(img_id,))])[None]
  with torch.no_grad():
    want = H.to_np(ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(hf["pixel_values"]),
                       image_sizes=torch.tensor(hf["image_sizes"])).logits)
  run = jax.jit(lambda p, px, s: model.apply({"params": p}, jnp.asarray(ids, jnp.int32), px,
                                             image_sizes=s))
  got = np.asarray(run(params, jnp.asarray(pixels)[None, None],
                       jnp.asarray(np.asarray([[size]], np.int32))))
  err = float(np.abs(got - want).max())
  print(f"567x1133 logits max |ours - HF| = {err:.2e}")
  assert err <= 1e-4
