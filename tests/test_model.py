"""VLM-level behaviour: packing with segment ids, attention implementations, checkpoint round trip."""
import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vlm
from vlm import checkpoint
from vlm.config import LlamaConfig, Runtime, TilerConfig, VisionConfig, VLMConfig
from vlm.model import VLM, abstract_params, init_params, unstack_layers

CFG = VLMConfig(
    llm=LlamaConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=64),
    vision=VisionConfig(image_size=28, patch_size=14, width=16, layers=2, heads=2, mlp_dim=32),
    tiler=TilerConfig(kind="single"), image_token_id=63)


def _sample(rng, n_text, with_image=True):
  ids = rng.integers(0, 63, size=n_text)
  if with_image:
    ids = np.concatenate([ids[:2], np.full(4, 63), ids[2:]])
  return ids.astype(np.int32)


def test_packed_row_equals_samples_run_separately():
  params = init_params(CFG, jax.random.key(0))
  model = VLM(CFG)
  rng = np.random.default_rng(0)
  a, b = _sample(rng, 7), _sample(rng, 9)
  pa, pb = rng.integers(0, 256, size=(2, 1, 1, 28, 28, 3), dtype=np.uint8)
  run = jax.jit(lambda ids, px, pos, seg: model.apply({"params": params}, ids, px, positions=pos,
                                                      segment_ids=seg))
  la = run(a[None], pa, np.arange(len(a))[None], np.ones((1, len(a)), np.int32))
  lb = run(b[None], pb, np.arange(len(b))[None], np.ones((1, len(b)), np.int32))
  pad = 3
  row = np.concatenate([a, b, np.zeros(pad, np.int32)])[None]
  seg = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.zeros(pad)]).astype(np.int32)[None]
  pos = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(pad)]).astype(np.int32)[None]
  px = np.concatenate([pa, pb], axis=1)  # the row's two images, in placeholder order
  packed = np.asarray(run(row, px, pos, seg))
  assert np.abs(packed[0, :len(a)] - np.asarray(la)[0]).max() <= 1e-5
  assert np.abs(packed[0, len(a):len(a) + len(b)] - np.asarray(lb)[0]).max() <= 1e-5
  # Without segment ids the second sample would see the first: the check above is not vacuous.
  leaky = np.asarray(run(row, px, pos, np.ones_like(seg)))
  assert np.abs(leaky[0, len(a):len(a) + len(b)] - np.asarray(lb)[0]).max() > 1e-3


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_pallas_attention_matches_xla_logits_and_grads():
  pallas = Runtime(attention="pallas")
  params = init_params(CFG, jax.random.key(1))
  rng = np.random.default_rng(1)
  ids = np.stack([_sample(rng, 12), _sample(rng, 12)])
  px = rng.integers(0, 256, size=(2, 1, 28, 28, 3), dtype=np.uint8)
  seg = np.ones(ids.shape, np.int32)
  seg[1, -3:] = 0

  def loss_fn(r):
    def loss(p):
      logits = VLM(CFG, r).apply({"params": p}, ids, px, segment_ids=seg)
      return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l1, lo1), g1 = loss_fn(Runtime())(params)
  (l2, lo2), g2 = loss_fn(pallas)(params)
  valid = seg > 0
  assert np.abs(np.asarray(lo1)[valid] - np.asarray(lo2)[valid]).max() <= 1e-4
  for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-4 * max(1.0, float(np.abs(x).max()))


def test_checkpoint_round_trip(tmp_path):
  params = init_params(CFG, jax.random.key(2))
  checkpoint.save(tmp_path / "ck", CFG, params)
  model, loaded = vlm.from_pretrained(str(tmp_path / "ck"))
  assert model.config == CFG
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_json_round_trip_and_unknown_keys():
  for name in ("llama3_med", "llava16_vicuna_13b", "mistral_7b_instruct_v02"):
    c = vlm.preset(name)
    assert VLMConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match="unknown keys"):
    VLMConfig.from_dict({"llm": {"vocab": 3}})


@pytest.mark.parametrize("remat", ["full", pytest.param("save_dots", marks=pytest.mark.slow),
                                   pytest.param("save_attn_proj", marks=pytest.mark.slow)])
def test_remat_policies_keep_gradients(remat):
  """Same gradients under each policy, and each policy really changes what the backward pass
  keeps: the residuals of the stacked decoder [layers, batch, tokens, ...] and tower [layers,
  images, tokens, ...] layers are what the policy's definition (vlm.families.module.REMAT_POLICIES) saves."""
  params = init_params(CFG, jax.random.key(3))
  rng = np.random.default_rng(3)
  ids = np.stack([_sample(rng, 10), _sample(rng, 10)])
  px = rng.integers(0, 256, size=(2, 1, 28, 28, 3), dtype=np.uint8)

  def grads(r):
    loss = lambda p: jnp.mean(VLM(CFG, r).apply({"params": p}, ids, px) ** 2)
    return jax.jit(jax.grad(loss))(params)
  policy = Runtime(remat=remat, vision_remat=remat)
  for x, y in zip(jax.tree_util.tree_leaves(grads(Runtime())),
                  jax.tree_util.tree_leaves(grads(policy))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)
  c, v = CFG.llm, CFG.vision
  dec = (c.layers,) + ids.shape                           # [layers, batch, tokens]
  tow = (v.layers, 2, v.grid ** 2 + 1)                    # [layers, images, patches + CLS]
  q, kv = (c.heads, c.head_dim), (c.kv_heads, c.head_dim)
  vh = (v.heads, v.width // v.heads)
  want = {   # nothing_saveable: each layer's input alone (the scan carry); every other residual
      # is recomputed in the backward pass
      "full": ([(c.hidden,)], [(v.width,)]),
      # save_only_these_names: the input + the tensors named q_proj, k_proj, v_proj, attn_out
      "save_attn_proj": ([(c.hidden,), q, kv, kv, (c.heads * c.head_dim,)],
                         [(v.width,), vh, vh, vh, (v.width,)]),
      # dots_with_no_batch_dims_saveable: the input + every weight matmul's output the backward
      # pass reads: q k v o gate up (down's and fc2's outputs only feed the residual sum; the
      # attention matmuls have batch dims)
      "save_dots": ([(c.hidden,), (c.heads * c.head_dim,), (c.kv_heads * c.head_dim,),
                     (c.kv_heads * c.head_dim,), (c.hidden,), (c.mlp_dim,), (c.mlp_dim,)],
                    [(v.width,)] * 5 + [(v.mlp_dim,)])}
  layer = lambda shapes, lead: sorted(s[3:] for s in shapes if s[:3] == lead and len(s) <= 5)
  saved = _saved_shapes(CFG, policy, params, ids, px)
  none = _saved_shapes(CFG, Runtime(), params, ids, px)
  for lead, expected in zip((dec, tow), want[remat]):
    assert layer(saved, lead) == sorted(expected), (lead, layer(saved, lead))
    assert len(layer(none, lead)) > len(expected)         # without remat: far more is kept


def _saved_shapes(cfg, runtime, params, ids, px):
  """Shapes of the residuals the backward pass keeps (jax.ad_checkpoint.print_saved_residuals)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: VLM(cfg, runtime).apply({"params": p}, ids, px).sum(), params)
  return [tuple(map(int, m.group(1).split(","))) for m in
          re.finditer(r"^[a-z0-9]+\[([\d,]+)\]", out.getvalue(), re.M)]


def test_tower_remat_policy_is_its_own_and_saves_its_named_tensors():
  """vision_remat alone decides what the tower keeps per layer, counted on the residuals of a
  gradient through the tower: stacked [layers, images, tokens, ...] activations."""
  cfg = CFG.replace(vision=dataclasses.replace(CFG.vision, layers=3, select_layer=-1))
  params = abstract_params(cfg, boxed=False)  # tracing only: shapes are enough
  rng = np.random.default_rng(5)
  ids = np.stack([_sample(rng, 8), _sample(rng, 8)])
  px = rng.integers(0, 256, size=(2, 1, 28, 28, 3), dtype=np.uint8)
  n_img, tokens, heads, hd = 2, 5, 2, 8          # 4 patches + CLS per image, width 16 = 2 x 8
  tower = lambda shapes: sorted(s for s in shapes if s[:3] == (3, n_img, tokens))
  llm = lambda shapes: [s for s in shapes if s[:3] == (2,) + ids.shape]
  got = {p: _saved_shapes(cfg, Runtime(remat="full", vision_remat=p), params, ids, px)
         for p in ("none", "full", "save_dots", "save_attn_proj")}
  x = (3, n_img, tokens, 16)
  assert tower(got["full"]) == [x]                                      # each layer's input
  assert tower(got["save_attn_proj"]) == sorted([x, x] + [(3, n_img, tokens, heads, hd)] * 3)
  assert tower(got["save_dots"]) == sorted([x] * 5 + [(3, n_img, tokens, 32)])  # q k v o fc1
  assert len(tower(got["none"])) > len(tower(got["save_dots"]))
  assert len({len(llm(s)) for s in got.values()}) == 1                  # the decoder: model.remat
  own = _saved_shapes(cfg, Runtime(remat="none", vision_remat="full"), params, ids, px)
  assert tower(own) == [x] and len(llm(own)) > len(llm(got["full"]))


def test_bfloat16_compute_close_to_float32():
  params = init_params(CFG, jax.random.key(4))
  rng = np.random.default_rng(4)
  ids = np.stack([_sample(rng, 10)])
  px = rng.integers(0, 256, size=(1, 1, 28, 28, 3), dtype=np.uint8)
  run = lambda r: jax.jit(lambda p: VLM(CFG, r).apply({"params": p}, ids, px))(params)
  f32, bf = np.asarray(run(Runtime())), run(Runtime(dtype="bfloat16"))
  assert bf.dtype == jnp.float32  # logits always float32
  rel = np.abs(np.asarray(bf) - f32).max() / np.abs(f32).max()
  assert rel <= 2e-2, rel


@pytest.mark.parametrize("window,scan", [(None, True), (3, True), (3, False)])
def test_kv_cache_chunks_equal_full_forward(window, scan):
  """A left-padded prompt fills an empty cache, a 3-token chunk and then single tokens are
  appended at a traced index: every chunk's logits equal the full forward's (sliding window too),
  and the cache holds exactly the k/v a full prefill writes. scan=False: per-layer params (from
  model.unstack_layers) and a tuple of per-layer cache buffers."""
  llm = dataclasses.replace(CFG.llm, sliding_window=window)
  cfg = VLMConfig(llm=llm)
  params = init_params(VLMConfig(llm=llm), jax.random.key(1))
  if not scan:
    params = unstack_layers(params)
  model = VLM(cfg, Runtime(scan_layers=scan))
  rng = np.random.default_rng(5)
  b, pad, p, s = 2, np.array([0, 2]), 6, 16
  ids = rng.integers(0, 63, size=(b, p + 5)).astype(np.int32)
  seg = (np.arange(p + 5)[None] >= pad[:, None]).astype(np.int32)  # row 1: 2 pad slots
  pos = np.maximum(np.arange(p + 5)[None] - pad[:, None], 0).astype(np.int32)
  full = model.apply({"params": params}, ids, positions=pos, segment_ids=seg)
  layer = jnp.zeros((b, llm.kv_heads, s, llm.head_dim))
  kv = jnp.stack([layer] * llm.layers) if scan else (layer,) * llm.layers
  cache = {"k": kv, "v": kv, "index": 0,
           "segment_ids": jnp.asarray(np.pad(seg, ((0, 0), (0, s - p - 5)), constant_values=1))}
  step = jax.jit(lambda c, x, ps, sg: model.apply({"params": params}, x, positions=ps,
                                                   segment_ids=sg, cache=c))
  out, cache = jax.jit(lambda c: model.apply({"params": params}, ids[:, :p], positions=pos[:, :p],
                                             segment_ids=seg[:, :p], cache=c))(cache)
  outs = [out]
  for lo, hi in ((p, p + 3), (p + 3, p + 4), (p + 4, p + 5)):
    cache["index"] = jnp.int32(lo)
    out, cache = step(cache, ids[:, lo:hi], pos[:, lo:hi], seg[:, lo:hi])
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1)[seg == 1], np.asarray(full)[seg == 1],
                             atol=1e-4, rtol=0)
  # The filled slots equal what one prefill of all p + 5 tokens writes; the rest stay zero.
  _, ref = jax.jit(lambda c: model.apply({"params": params}, ids, positions=pos, segment_ids=seg,
                                         cache=c))(dict(cache, k=kv, v=kv, index=0))
  got, want = (np.stack(jax.tree.leaves(c)) for c in ((cache["k"], cache["v"]),
                                                       (ref["k"], ref["v"])))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(want[..., :p + 5, :]).min(axis=-1).max() > 0 and not want[..., p + 5:, :].any()
