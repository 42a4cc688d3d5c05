"""S2 multi-scale features vs an independent torch reference, and the full-size preset's shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from vlm import hf
from tests import hf_models as H
from vlm import tiler
from vlm.config import LLAMA3_MED, TilerConfig, VLMConfig
from vlm.model import VLM, abstract_params, normalize_pixels
from vlm.vision import VisionTower


def _torch_s2(tower, x, scales, tile):
  """s2wrapper's recipe, written directly in torch: bicubic resize, chessboard split, encode,
  layer -2 without CLS, merge, area-pool to the base grid, concat on channels."""
  outs = []
  for s in scales:
    xs = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
    k = s // tile
    tiles = torch.cat([xs[:, :, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                       for i in range(k) for j in range(k)], dim=0)
    f = tower(pixel_values=tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
    g = int(f.shape[1] ** 0.5)
    f = f.reshape(k * k, x.shape[0], g, g, -1).permute(1, 0, 4, 2, 3)  # [n, k*k, C, g, g]
    rows = [torch.cat([f[:, i * k + j] for j in range(k)], dim=-1) for i in range(k)]
    fmap = torch.cat(rows, dim=-2)  # [n, C, k*g, k*g]
    fmap = F.interpolate(fmap, size=(g, g), mode="area")
    outs.append(fmap.flatten(2).transpose(1, 2))
  return torch.cat(outs, dim=-1)


def test_s2_features_match_torch_reference():
  ref = H.build(T.CLIPVisionModel, H.clip_config(), seed=5)
  vcfg = hf.vision_config(ref.config.to_dict())
  params = hf.import_weights(VLMConfig(vision=vcfg), {hf.canonical_name(k): v.numpy() for k, v in
                                                      ref.state_dict().items()},
                             components=("vision",))["vision"]
  scales = (28, 56, 84)
  x = np.random.default_rng(0).normal(size=(2, 84, 84, 3)).astype(np.float32)
  with torch.no_grad():
    want = H.to_np(_torch_s2(ref, torch.tensor(x).permute(0, 3, 1, 2), scales, 28))
  tower = VisionTower(vcfg)
  encode = lambda t: tower.apply({"params": params}, t)
  got = np.asarray(jax.jit(lambda p: tiler.s2_features(encode, p, scales, 28, 2))(jnp.asarray(x)))
  assert got.shape == (2, 4, 3 * 16) == want.shape
  assert np.abs(got - want).max() <= 1e-4


def test_bicubic_matrix_is_torch_bicubic():
  x = np.random.default_rng(1).normal(size=(1, 3, 50, 50)).astype(np.float32)
  for size in (17, 25, 80):
    want = F.interpolate(torch.tensor(x), size=(size, size), mode="bicubic", align_corners=False)
    got = tiler.bicubic_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), size)
    assert np.abs(np.asarray(got) - H.to_np(want).transpose(0, 2, 3, 1)).max() <= 1e-5


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_uint8_pixels_are_normalized_in_model():
  llm = hf.text_config(H.llama_config().to_dict())
  ref = H.build(T.CLIPVisionModel, H.clip_config(), seed=6)
  cfg = VLMConfig(llm=llm, vision=hf.vision_config(ref.config.to_dict()),
                  tiler=TilerConfig(kind="s2", scales=(28, 56)), image_token_id=95)
  model = VLM(cfg)
  rng = np.random.default_rng(2)
  ids = jnp.asarray([[1, 2] + [95] * 4 + [3]], jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  u8 = rng.integers(0, 256, size=(1, 1, 56, 56, 3), dtype=np.uint8)
  f32 = normalize_pixels(jnp.asarray(u8), cfg.vision.mean, cfg.vision.std)
  run = jax.jit(lambda x: model.apply({"params": params}, ids, x))
  a, b = run(jnp.asarray(u8)), run(f32)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert not np.allclose(np.asarray(a), np.asarray(run(jnp.zeros_like(f32))))


def test_llama3_med_preset_shapes_without_allocating():
  cfg = LLAMA3_MED
  assert cfg.feature_dim == 3840 and cfg.image_tokens() == 729
  shapes = abstract_params(cfg, boxed=False)
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t))
  tower = count(shapes["vision"])
  llm = count(shapes["llm"])
  assert abs(tower - 632e6) / 632e6 < 0.01, tower
  assert abs(llm - 8.03e9) / 8.03e9 < 0.002, llm
  model = VLM(cfg)
  px = jax.ShapeDtypeStruct((2, 1, 1134, 1134, 3), jnp.uint8)
  feats, counts = jax.eval_shape(
      lambda p, x: model.apply({"params": p}, x, method=VLM.encode_images), shapes, px)
  assert feats.shape == (2, 1, 729, 4096) and counts.shape == (2, 1)
  pre = jax.eval_shape(lambda p, x: tiler.s2_features(
      lambda t: VisionTower(cfg.vision).apply({"params": p["vision"]}, t), x, cfg.tiler.scales, 378,
      27), shapes, jax.ShapeDtypeStruct((2, 1134, 1134, 3), jnp.float32))
  assert pre.shape == (2, 729, 3840)
