"""CLIP tower parity: HF CLIPVisionModel (gelu, quick_gelu) and open_clip's weight layout."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from convert import open_clip
from vlm import hf
from tests import hf_models as H
from vlm.config import VLMConfig
from vlm.vision import VisionTower


def _tower_params(vcfg, tensors):
  cfg = VLMConfig(vision=vcfg)
  return hf.import_weights(cfg, tensors, components=("vision",))["vision"]


def _hf_tensors(model):
  return {hf.canonical_name(k): v.numpy() for k, v in model.state_dict().items()}


def _ours(vcfg, params, pixels):
  return np.asarray(VisionTower(vcfg).apply({"params": params}, jnp.asarray(pixels)))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("layer,keep_cls", [(-2, False), (-1, True), (1, False)])
def test_hf_clip_hidden_states(act, layer, keep_cls):
  ref = H.build(T.CLIPVisionModel, H.clip_config(act=act))
  vcfg = hf.vision_config(ref.config.to_dict(), select_layer=layer, keep_cls=keep_cls)
  params = _tower_params(vcfg, _hf_tensors(ref))
  px = np.random.default_rng(1).normal(size=(3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    hs = ref(pixel_values=torch.tensor(px).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
  want = H.to_np(hs[layer])
  want = want if keep_cls else want[:, 1:]
  got = _ours(vcfg, params, px)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= 1e-4


def _open_clip_state(ref):
  """Write the HF tower's weights exactly as open_clip names them (fused in_proj, conv1, ln_pre)."""
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  p = ""  # transformers 5 CLIPVisionModel keys carry no prefix
  out = {"visual.conv1.weight": sd[p + "embeddings.patch_embedding.weight"],
         "visual.class_embedding": sd[p + "embeddings.class_embedding"],
         "visual.positional_embedding": sd[p + "embeddings.position_embedding.weight"],
         "visual.ln_pre.weight": sd[p + "pre_layrnorm.weight"], "visual.ln_pre.bias": sd[p + "pre_layrnorm.bias"],
         "visual.ln_post.weight": sd[p + "post_layernorm.weight"],
         "visual.ln_post.bias": sd[p + "post_layernorm.bias"],
         "visual.proj": np.zeros((16, 16), np.float32), "logit_scale": np.ones((), np.float32),
         "text_projection": np.zeros((16, 16), np.float32)}
  for i in range(ref.config.num_hidden_layers):
    q = f"{p}encoder.layers.{i}."
    r = f"visual.transformer.resblocks.{i}."
    for wb in ("weight", "bias"):
      out[r + "attn.in_proj_" + wb] = np.concatenate(
          [sd[q + f"self_attn.{n}_proj.{wb}"] for n in "qkv"], axis=0)
      out[r + "attn.out_proj." + wb] = sd[q + "self_attn.out_proj." + wb]
      out[r + "ln_1." + wb] = sd[q + "layer_norm1." + wb]
      out[r + "ln_2." + wb] = sd[q + "layer_norm2." + wb]
      out[r + "mlp.c_fc." + wb] = sd[q + "mlp.fc1." + wb]
      out[r + "mlp.c_proj." + wb] = sd[q + "mlp.fc2." + wb]
  return out


OC_VISION = {"image_size": 28, "layers": 3, "width": 16, "head_width": 8, "patch_size": 14,
             "mlp_ratio": 2.0}


def _open_clip_error(ref, vcfg, seed):
  """max |ours - HF| on the layer -2 patch tokens, our tower built from the open_clip layout."""
  params = _tower_params(vcfg, open_clip.canonical_vision(_open_clip_state(ref)))
  px = np.random.default_rng(seed).normal(size=(2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = H.to_np(ref(pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
                       output_hidden_states=True).hidden_states[-2])[:, 1:]
  return np.abs(_ours(vcfg, params, px) - want).max()


def test_open_clip_layout_matches_hf_tower():
  ref = H.build(T.CLIPVisionModel, H.clip_config(act="quick_gelu"), seed=3)
  oc_cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": OC_VISION},
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                               "std": [0.26862954, 0.26130258, 0.27577711]}}
  vcfg = open_clip.vision_config(oc_cfg)
  assert (vcfg.heads, vcfg.mlp_dim, vcfg.act) == (2, 32, "quick_gelu")
  assert _open_clip_error(ref, vcfg, 2) <= 1e-4


def test_open_clip_norm_eps_is_honoured():
  """vision_cfg.norm_kwargs.eps reaches every LayerNorm (ln_pre, ln_1, ln_2): checked against a HF
  tower with the same eps, large enough that 1e-5 would be far off."""
  hf_cfg = H.clip_config(act="quick_gelu")
  hf_cfg.layer_norm_eps = 0.1
  ref = H.build(T.CLIPVisionModel, hf_cfg, seed=4)
  oc_cfg = {"model_cfg": {"quick_gelu": True,
                          "vision_cfg": dict(OC_VISION, norm_kwargs={"eps": 0.1})}}
  vcfg = open_clip.vision_config(oc_cfg)
  assert vcfg.norm_eps == 0.1
  assert _open_clip_error(ref, vcfg, 5) <= 1e-4


@pytest.mark.parametrize("key,value", [
    ("no_ln_pre", True), ("ls_init_value", 1e-5), ("timm_model_name", "vit_base_patch16_224"),
    ("act_kwargs", {"approximate": "tanh"}), ("norm_kwargs", {"eps": 1e-6, "bias": False}),
    ("qk_norm", True), ("block_type", "custom"), ("attentional_pool", True),
    ("layers", [3, 4, 6, 3]), ("image_size", [28, 56]), ("some_future_key", 1)])
def test_open_clip_refuses_keys_that_change_the_math(key, value):
  oc_cfg = {"model_cfg": {"vision_cfg": dict(OC_VISION, **{key: value})}}
  with pytest.raises(hf.ConversionError, match=f"cfg.json: open_clip vision_cfg.*{key}") as e:
    open_clip.vision_config(oc_cfg, source="cfg.json")
  assert "\n" not in str(e.value)


def test_open_clip_accepts_keys_without_effect_on_the_features():
  harmless = dict(OC_VISION, no_ln_pre=False, ls_init_value=None, patch_dropout=0.5,
                  pool_type="avg", pos_embed_type="sin_cos_2d", output_tokens=True,
                  image_size=[28, 28], norm_kwargs={"eps": 1e-6})
  vcfg = open_clip.vision_config({"model_cfg": {"vision_cfg": harmless}})
  assert (vcfg.image_size, vcfg.norm_eps, vcfg.act) == (28, 1e-6, "gelu")


def test_open_clip_rejects_unknown_visual_key():
  with pytest.raises(hf.ConversionError, match="unexpected key visual.transformer.resblocks.0.attn.foo"):
    open_clip.canonical_vision({"visual.transformer.resblocks.0.attn.foo.weight": np.zeros(1)},
                               source="x.bin")
