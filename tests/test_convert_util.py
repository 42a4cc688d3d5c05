"""Shared builders for the conversion tests (no tests in this file): tiny HF models, the LLaVA
code-base layout written from them by hand, and exact tree comparisons."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch
import transformers as T
from flax.traverse_util import flatten_dict

from convert.cli import main
from tests import hf_models as H

IMG = 95
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def cli(*args):
  main([str(a) for a in args])


def hf_model(kind: str, *, vocab: int = 96, image_token: int = IMG, seed: int = 0, **kw):
  """A tiny random HF model: llama | mistral | llava | llava_next."""
  if kind in ("llama", "mistral"):
    cls = T.MistralForCausalLM if kind == "mistral" else T.LlamaForCausalLM
    return H.build(cls, H.llama_config(vocab=vocab, mistral=kind == "mistral", **kw), seed=seed)
  text = H.llama_config(vocab=vocab, **kw)
  if kind == "llava":
    cfg = T.LlavaConfig(vision_config=H.clip_config(), text_config=text,
                        image_token_index=image_token)
    return H.build(T.LlavaForConditionalGeneration, cfg, seed=seed)
  cfg = T.LlavaNextConfig(vision_config=H.clip_config(), text_config=text,
                          image_token_index=image_token, image_grid_pinpoints=PINPOINTS)
  return H.build(T.LlavaNextForConditionalGeneration, cfg, seed=seed)


def st_tensors(path) -> dict:
  """Every tensor of the *.safetensors files directly in `path` (torch, so bfloat16 too)."""
  from safetensors.torch import load_file
  out = {}
  for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
    out.update(load_file(f))
  return out


def ckpt(path):
  """(config, flat numpy params) of a checkpoint of this project."""
  from vlm import checkpoint
  cfg, params = checkpoint.load(path)
  return cfg, {k: np.asarray(v) for k, v in flatten_dict(params).items()}


def assert_same(a: dict, b: dict):
  """Two flat trees: same keys, dtypes, shapes and bytes."""
  assert set(a) == set(b), set(a) ^ set(b)
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
    assert x.tobytes() == y.tobytes(), k


# --- the LLaVA code-base layout ------------------------------------------------------------------

def llava_key(k: str) -> str:
  """transformers 5 Llava module names -> the LLaVA code base's (written independently of
  convert/llava.py so the test checks it)."""
  if k.startswith("model.language_model."):
    return "model." + k[len("model.language_model."):]
  if k.startswith("model.vision_tower."):
    return "model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]
  if k.startswith("model.multi_modal_projector.linear_"):
    n, rest = k[len("model.multi_modal_projector.linear_"):].split(".", 1)
    return f"model.mm_projector.{2 * (int(n) - 1)}.{rest}"
  assert k in ("lm_head.weight", "model.image_newline"), k
  return k


def llava_config(ref, tower: str, **mm) -> dict:
  """The config.json LLaVA's train.py writes for a Llama-based model built like `ref`."""
  d = ref.config.text_config.to_dict()
  d.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
           mm_vision_tower=tower, mm_hidden_size=ref.config.vision_config.hidden_size,
           mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
           mm_vision_select_feature="patch", mm_patch_merge_type="flat", image_aspect_ratio="pad",
           mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True)
  d.update(mm)
  return d


def write_llava_dir(path, state: dict, config: dict, *, shards: int = 2):
  """pytorch_model-0000i-of-0000n.bin shards + index + config.json, as the code base saves."""
  os.makedirs(path, exist_ok=True)
  keys = sorted(state)
  weight_map = {}
  for i in range(shards):
    name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
    part = {k: state[k].contiguous() for k in keys[i::shards]}
    torch.save(part, os.path.join(path, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


def llava_state(ref) -> dict:
  sd = {llava_key(k): v.detach().clone() for k, v in ref.state_dict().items()}
  # transformers 4.3x wrote these buffers too; importers must skip them
  sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
  return sd
