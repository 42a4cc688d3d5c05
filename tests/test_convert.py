"""`python -m convert` with HF dirs: HF -> ours -> HF is bit-exact and transformers loads the export
(no missing / unexpected keys, same logits); open_clip towers; the Llama3-Med composition."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from tests import hf_models as H
from tests import tiny_tokenizers
from tests.test_convert_util import IMG, assert_same, ckpt, cli, hf_model, st_tensors

CLASSES = {"llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM,
           "llava": T.LlavaForConditionalGeneration,
           "llava_next": T.LlavaNextForConditionalGeneration}


def _inputs(kind, rng, cfg):
  ids = H.rand_ids(rng, (2, 12), 96, avoid=(IMG,))
  if kind == "llama" or kind == "mistral":
    return {"input_ids": torch.tensor(ids)}
  if kind == "llava":
    ids[:, 2:6] = IMG
    return {"input_ids": torch.tensor(ids),
            "pixel_values": torch.tensor(rng.normal(size=(2, 3, 28, 28)), dtype=torch.float32)}
  n, tiles = cfg.image_tokens((30, 50)), cfg.tiler.max_tiles(cfg.vision)
  ids = np.concatenate([ids[:, :2], np.full((2, n), IMG), ids[:, 2:]], 1)
  return {"input_ids": torch.tensor(ids), "image_sizes": torch.tensor([[30, 50], [30, 50]]),
          "pixel_values": torch.tensor(rng.normal(size=(2, tiles, 3, 28, 28)), dtype=torch.float32)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_hf_round_trip_bit_exact(kind, dtype, tmp_path):
  ref = hf_model(kind, tie=kind == "mistral").to(getattr(torch, dtype))
  src, out = tmp_path / "src", tmp_path / "export"
  ref.save_pretrained(src, max_shard_size="40KB")  # sharded, with an index
  assert os.path.exists(src / "model.safetensors.index.json")
  if kind == "llava":
    tiny_tokenizers.llama2_tokenizer(src)  # tokenizer files beside the weights
    for f in os.listdir(src / "llama2_tok"):
      os.rename(src / "llama2_tok" / f, src / f)
  cli("import", "--from", "hf", src, "--out", tmp_path / "ck")
  cfg, params = ckpt(tmp_path / "ck")
  assert {str(v.dtype) for v in params.values()} == {dtype}
  if kind == "llava" and dtype == "float32":  # transformers 4 spelled the tower vision_model.*
    from safetensors.torch import save_file
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model."): v
              for k, v in st_tensors(src).items()}
    os.makedirs(tmp_path / "legacy")
    save_file(legacy, tmp_path / "legacy" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "legacy")
    cli("import", "--from", "hf", tmp_path / "legacy", "--out", tmp_path / "ck_legacy")
    assert_same(ckpt(tmp_path / "ck_legacy")[1], params)
  cli("export", "--to", "hf", tmp_path / "ck", "--out", out, "--max-shard-size", "30KB")
  assert os.path.exists(out / "model.safetensors.index.json")
  want, got = st_tensors(src), st_tensors(out)
  assert set(want) == set(got)
  for k in want:
    assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
  if kind == "llava":
    assert os.path.exists(out / "tokenizer.json")
  if kind.startswith("llava"):
    with open(out / "preprocessor_config.json") as f:
      assert json.load(f)["crop_size"] == {"height": 28, "width": 28}
  back, info = CLASSES[kind].from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert next(back.parameters()).dtype == getattr(torch, dtype)
  inputs = _inputs(kind, np.random.default_rng(0), cfg)
  orig = CLASSES[kind].from_pretrained(src).eval()  # as transformers loads the original
  with torch.no_grad():
    a, b = orig(**inputs).logits, back.eval()(**inputs).logits
  assert torch.equal(a, b) and a.abs().max() > 0.1


def _open_clip_dir(path, ref, fmt):
  from tests.test_vision import _open_clip_state
  os.makedirs(path, exist_ok=True)
  cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": True,
                       "vision_cfg": {"image_size": 28, "layers": 3, "width": 16, "head_width": 8,
                                      "patch_size": 14, "mlp_ratio": 2.0},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16}},
         "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                            "std": [0.26862954, 0.26130258, 0.27577711]}}
  with open(os.path.join(path, "open_clip_config.json"), "w") as f:
    json.dump(cfg, f)
  state = _open_clip_state(ref)
  state["token_embedding.weight"] = np.zeros((10, 16), np.float32)  # text tower: skipped
  if fmt == "bin":
    torch.save({k: torch.tensor(v) for k, v in state.items()},
               os.path.join(path, "open_clip_pytorch_model.bin"))
  else:
    from safetensors.numpy import save_file
    save_file(state, os.path.join(path, "open_clip_model.safetensors"))
  return path


def test_open_clip_import_matches_hf_tower(tmp_path):
  from vlm.vision import VisionTower
  ref = H.build(T.CLIPVisionModel, H.clip_config(act="quick_gelu"), seed=3)
  px = np.random.default_rng(2).normal(size=(2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    want = H.to_np(ref(pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
                       output_hidden_states=True).hidden_states[-2])[:, 1:]
  got = {}
  run = jax.jit(lambda cfg, p: VisionTower(cfg).apply({"params": p}, jnp.asarray(px)),
                static_argnums=0)
  for fmt in ("bin", "safetensors"):
    src = _open_clip_dir(tmp_path / fmt, ref, fmt)
    cli("import", "--from", "open_clip", src, "--out", tmp_path / f"ck_{fmt}")
    cfg, flat = ckpt(tmp_path / f"ck_{fmt}")
    assert {k[0] for k in flat} == {"vision"} and cfg.vision.act == "quick_gelu"
    from vlm import checkpoint
    _, params = checkpoint.load(tmp_path / f"ck_{fmt}")
    out = np.asarray(run(cfg.vision, params["vision"]))
    assert np.abs(out - want).max() <= 1e-4
    got[fmt] = flat
  assert_same(got["bin"], got["safetensors"])


def test_compose_llama3_med(tmp_path):
  tok = tiny_tokenizers.llama3_tokenizer(tmp_path, image_token=False)
  n_tok = len(tiny_tokenizers.load(tok))
  llm = hf_model("llama", vocab=n_tok, rope=H.LLAMA3_ROPE, seed=1)
  llm.save_pretrained(tmp_path / "llm")
  for f in os.listdir(tok):
    os.rename(os.path.join(tok, f), tmp_path / "llm" / f)
  clip = H.build(T.CLIPVisionModel, H.clip_config(act="quick_gelu"), seed=3)
  vision = _open_clip_dir(tmp_path / "dfn", clip, "safetensors")
  cli("import", "--llm", tmp_path / "llm", "--vision", vision, "--preset", "llama3_med",
      "--out", tmp_path / "ck", "--seed", "5")
  cfg, p = ckpt(tmp_path / "ck")
  assert cfg.tiler.kind == "s2" and cfg.tiler.scales == (28, 56, 84)
  assert cfg.template == "llama3" and cfg.connector.kind == "mlp2x_gelu"
  assert cfg.llm.vocab_size == n_tok + 1 and cfg.image_token_id == n_tok
  saved = tiny_tokenizers.load(str(tmp_path / "ck" / "tokenizer"))
  assert saved.convert_tokens_to_ids("<image>") == n_tok
  emb = llm.model.embed_tokens.weight.detach().numpy()
  assert np.array_equal(p[("llm", "embed")][:n_tok], emb)
  np.testing.assert_allclose(p[("llm", "embed")][n_tok], emb.mean(0), rtol=1e-6, atol=1e-7)
  head = llm.lm_head.weight.detach().numpy()
  np.testing.assert_allclose(p[("llm", "lm_head", "kernel")][:, n_tok], head.mean(0), rtol=1e-6,
                             atol=1e-7)
  assert p[("connector", "fc0", "kernel")].shape == (48, 32)
  assert np.array_equal(p[("vision", "cls")], clip.embeddings.class_embedding.detach().numpy())
  assert np.abs(p[("connector", "fc0", "kernel")]).max() > 0  # fresh, from the seed
  assert cfg.image_tokens() == 4 and cfg.feature_dim == 48
  # A stage-1 projector instead of a fresh connector.
  rng = np.random.default_rng(0)
  proj = {f"model.mm_projector.{i}.{wb}": torch.tensor(rng.normal(size=shape), dtype=torch.float32)
          for i, n_in in ((0, 48), (2, 32))
          for wb, shape in (("weight", (32, n_in)), ("bias", (32,)))}
  torch.save(proj, tmp_path / "mm_projector.bin")
  cli("import", "--llm", tmp_path / "llm", "--vision", vision, "--preset", "llama3_med",
      "--connector", tmp_path / "mm_projector.bin", "--out", tmp_path / "ck2")
  _, p2 = ckpt(tmp_path / "ck2")
  want = proj["model.mm_projector.2.weight"].numpy().T
  assert np.array_equal(p2[("connector", "fc1", "kernel")], want)
  assert np.array_equal(p2[("llm", "embed")], p[("llm", "embed")])


def test_import_and_export_keep_the_tokenizer_settings(tmp_path):
  """Adding <image> on import (here a composition; LLaVA-Med v1.5 through --from llava alike)
  rewrites the tokenizer: Mistral's legacy SentencePiece tokenizer (tokenizer.model only, as
  Mistral-7B-Instruct-v0.2's config describes it) must tokenize the same before the import, in
  the checkpoint and after the export, and keep its settings."""
  src = tiny_tokenizers.mistral_tokenizer(tmp_path, legacy=True, padding_side="left",
                                          model_max_length=32768)
  llm_dir = tmp_path / "llm"
  hf_model("mistral", vocab=32000, seed=1).save_pretrained(llm_dir)
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), llm_dir / f)
  vision = _open_clip_dir(tmp_path / "clip", H.build(T.CLIPVisionModel, H.clip_config(), seed=3),
                          "safetensors")
  cli("import", "--llm", llm_dir, "--vision", vision, "--preset", "llama3_med_mistral",
      "--out", tmp_path / "ck")
  cli("export", "--to", "llava", tmp_path / "ck", "--out", tmp_path / "out")
  before = tiny_tokenizers.load(src)
  with open(os.path.join(src, "tokenizer_config.json")) as f:
    settings = {k: v for k, v in json.load(f).items() if k != "added_tokens_decoder"}
  texts = ["<s>[INST] What is shown? [/INST] A 3 cm cyst.</s>[INST] Where? [/INST]",
           "USER: Is it normal? ASSISTANT: No.</s>USER: Why?", "</s> spaced  out\n\ntext"]
  for where in (tmp_path / "ck" / "tokenizer", tmp_path / "out"):
    tok = tiny_tokenizers.load(str(where))
    assert tok.convert_tokens_to_ids("<image>") == 32000 and len(tok) == 32001
    for text in texts:
      assert tok(text)["input_ids"] == before(text)["input_ids"], (where, text)
    with open(where / "tokenizer_config.json") as f:
      saved = json.load(f)
    assert {k: saved.get(k) for k in settings} == settings
    assert saved["added_tokens_decoder"]["32000"]["content"] == "<image>"
