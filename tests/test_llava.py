"""Whole-VLM parity with HF LlavaNextForConditionalGeneration (LlavaForConditionalGeneration:
tests/test_from_pretrained.py, through a fresh interpreter that imports only vlm)."""
import jax.numpy as jnp
import numpy as np
import torch
import transformers as T

import vlm
from tests import hf_models as H

IMG = 95  # <image> id in the tiny vocab
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # LLaVA-1.6's grid, scaled to 28px tiles


def _row(rng, n_img_tokens, before=3, after=5):
  return np.concatenate([H.rand_ids(rng, (before,), 96, avoid=(IMG,)), np.full(n_img_tokens, IMG),
                         H.rand_ids(rng, (after,), 96, avoid=(IMG,))])


def test_llava_next_anyres_logits(tmp_path):
  cfg = T.LlavaNextConfig(vision_config=H.clip_config(), text_config=H.llama_config(),
                          image_token_index=IMG, image_grid_pinpoints=PINPOINTS)
  ref = H.build(T.LlavaNextForConditionalGeneration, cfg, tmp_path)
  model, params = vlm.from_pretrained(str(tmp_path))
  assert model.config.tiler.kind == "anyres"
  rng = np.random.default_rng(1)
  sizes = [(60, 25), (30, 70)]  # tall and wide: different grids and unpadding axes
  counts = [model.config.image_tokens(s) for s in sizes]
  assert counts[0] != counts[1]
  rows = [_row(rng, n, 2, 4 + max(counts) - n) for n in counts]  # same length, image inside
  ids = np.stack(rows)
  tiles = model.config.tiler.max_tiles(model.config.vision)
  px = rng.normal(size=(2, tiles, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = H.to_np(ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px).permute(0, 1, 4, 2, 3),
                       image_sizes=torch.tensor(sizes)).logits)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                               jnp.asarray(px)[:, None], image_sizes=jnp.asarray(sizes)[:, None]))
  assert np.abs(got - want).max() <= 1e-4
