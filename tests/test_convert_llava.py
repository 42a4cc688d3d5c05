"""`--from llava` / `--to llava`: checkpoints of the original LLaVA code base (full, anyres, S2,
stage-1 projector, LoRA output), checked against the transformers / peft model they were written
from, and `--to llava` exports re-importing identically."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from tests import hf_models as H
from tests import tiny_tokenizers
from tests.test_convert_util import (assert_same, ckpt, cli, hf_model, llava_config,
                                     llava_key, llava_state, st_tensors, write_llava_dir)
from vlm import checkpoint
from vlm.model import VLM

ASYM = [[28, 56], [56, 56]]  # (height, width) pinpoints whose [w, h] spelling differs


def _tokenizer(tmp_path):
  tok = tiny_tokenizers.llama3_tokenizer(tmp_path, image_token=False)
  return tok, len(tiny_tokenizers.load(tok))


def _ref(kind, vocab, seed=0):
  """HF reference with the placeholder at vocab - 1; our import appends <image> at `vocab`."""
  model = hf_model(kind, vocab=vocab, image_token=vocab - 1, seed=seed)
  if kind == "llava_next":
    model.config.image_grid_pinpoints = ASYM
  return model


def _batch(cfg, vocab, rng):
  size = (30, 50)
  n = cfg.image_tokens(size) if cfg.tiler.kind == "anyres" else cfg.image_tokens()
  text = H.rand_ids(rng, (2, 6), vocab - 1)
  ids = np.concatenate([text[:, :2], np.full((2, n), vocab), text[:, 2:]], 1)
  if cfg.tiler.kind == "anyres":
    px = rng.normal(size=(2, 1, cfg.tiler.max_tiles(cfg.vision), 28, 28, 3)).astype(np.float32)
    return ids, px, np.array([[size], [size]])
  return ids, rng.normal(size=(2, 1, 28, 28, 3)).astype(np.float32), None


def _hf_logits(ref, ids, px, sizes, vocab):
  ids = np.where(ids == vocab, vocab - 1, ids)  # the reference's placeholder id
  kw = {"input_ids": torch.tensor(ids)}
  if sizes is not None:
    kw.update(pixel_values=torch.tensor(px[:, 0]).permute(0, 1, 4, 2, 3),
              image_sizes=torch.tensor(sizes[:, 0]))
  else:
    kw.update(pixel_values=torch.tensor(px[:, 0]).permute(0, 3, 1, 2))
  with torch.no_grad():
    return H.to_np(ref(**kw).logits)


def _our_logits(path, ids, px, sizes):
  cfg, params = checkpoint.load(path)
  run = jax.jit(lambda p: VLM(cfg).apply({"params": p}, jnp.asarray(ids, jnp.int32),
                                         jnp.asarray(px), image_sizes=sizes))
  return np.asarray(run(params))


def _full_dir(tmp_path, ref, tok, **mm):
  tower = tmp_path / "clip_tower"  # mm_vision_tower: a local HF CLIP dir, as LLaVA-Med configs
  ref.model.vision_tower.save_pretrained(tower)
  src = tmp_path / "llava_src"
  write_llava_dir(src, llava_state(ref), llava_config(ref, str(tower), **mm))
  for f in os.listdir(tok):
    os.rename(os.path.join(tok, f), src / f)
  return src


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_full_checkpoint_matches_reference_and_round_trips(kind, tmp_path):
  tok, vocab = _tokenizer(tmp_path)
  ref = _ref(kind, vocab)
  mm = {}
  if kind == "llava_next":
    mm = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
              image_grid_pinpoints=[[w, h] for h, w in ASYM])
  src = _full_dir(tmp_path, ref, tok, **mm)
  cli("import", "--from", "llava", src, "--out", tmp_path / "ck")
  cfg, p = ckpt(tmp_path / "ck")
  assert cfg.image_token_id == vocab and cfg.llm.vocab_size == vocab + 1
  if kind == "llava_next":
    assert cfg.tiler.kind == "anyres" and cfg.tiler.grid_pinpoints == tuple(map(tuple, ASYM))
  ids, px, sizes = _batch(cfg, vocab, np.random.default_rng(0))
  want = _hf_logits(ref, ids, px, sizes, vocab)
  got = _our_logits(tmp_path / "ck", ids, px, sizes)
  assert np.abs(got[..., :vocab] - want).max() <= 1e-4

  cli("export", "--to", "llava", tmp_path / "ck", "--out", tmp_path / "out")
  exported = st_tensors(tmp_path / "out")
  source = llava_state(ref)
  del source["model.layers.0.self_attn.rotary_emb.inv_freq"]
  assert set(exported) == set(source)  # the code base's names, exactly
  for k, v in source.items():
    e = exported[k]
    e = e[:vocab] if k == "model.embed_tokens.weight" else e[:vocab] if k == "lm_head.weight" else e
    assert torch.equal(e, v), k
  with open(tmp_path / "out" / "config.json") as f:
    conf = json.load(f)
  assert conf["mm_vision_tower"] == str(tmp_path / "out" / "vision_tower")
  if kind == "llava_next":
    assert conf["image_grid_pinpoints"] == [[w, h] for h, w in ASYM]
  cli("import", "--from", "llava", tmp_path / "out", "--out", tmp_path / "ck2")
  cfg2, p2 = ckpt(tmp_path / "ck2")
  assert cfg2 == cfg
  assert_same(p, p2)


def test_s2_round_trip_and_hf_refusal(tmp_path, capsys):
  tok, vocab = _tokenizer(tmp_path)
  ref = _ref("llava", vocab)
  state = llava_state(ref)
  rng = np.random.default_rng(3)
  proj = rng.normal(size=(32, 32)).astype(np.float32)
  state["model.mm_projector.0.weight"] = torch.tensor(proj)
  src = _full_dir(tmp_path, ref, tok, s2=True, s2_scales="56,28", mm_hidden_size=32)
  write_llava_dir(src, state, llava_config(ref, str(tmp_path / "clip_tower"), s2=True,
                                           s2_scales="56,28", mm_hidden_size=32))
  cli("import", "--from", "llava", src, "--out", tmp_path / "ck")
  cfg, p = ckpt(tmp_path / "ck")
  assert cfg.tiler.kind == "s2" and cfg.tiler.scales == (28, 56) and cfg.tiler.resize_mode == "pad"
  assert np.array_equal(p[("connector", "fc0", "kernel")], proj.T)
  with pytest.raises(SystemExit):
    cli("export", "--to", "hf", tmp_path / "ck", "--out", tmp_path / "hf")
  assert "--to llava" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "hf" / "config.json")
  cli("export", "--to", "llava", tmp_path / "ck", "--out", tmp_path / "out")
  with open(tmp_path / "out" / "config.json") as f:
    conf = json.load(f)
  assert conf["s2"] is True and conf["s2_scales"] == "28,56" and conf["mm_hidden_size"] == 32
  cli("import", "--from", "llava", tmp_path / "out", "--out", tmp_path / "ck2")
  cfg2, p2 = ckpt(tmp_path / "ck2")
  assert cfg2 == cfg
  assert_same(p, p2)


def test_stage1_projector_alone(tmp_path):
  llm = hf_model("llama", seed=1)
  llm.save_pretrained(tmp_path / "vicuna")
  clip = H.build(__import__("transformers").CLIPVisionModel, H.clip_config(), seed=2)
  clip.save_pretrained(tmp_path / "clip")
  stage1 = tmp_path / "stage1"
  os.makedirs(stage1)
  rng = np.random.default_rng(0)
  proj = {"model.mm_projector.0.weight": rng.normal(size=(32, 16)),
          "model.mm_projector.0.bias": rng.normal(size=(32,)),
          "model.mm_projector.2.weight": rng.normal(size=(32, 32)),
          "model.mm_projector.2.bias": rng.normal(size=(32,))}
  torch.save({k: torch.tensor(v, dtype=torch.float32) for k, v in proj.items()},
             stage1 / "mm_projector.bin")
  conf = dict(llm.config.to_dict(), model_type="llava_llama", mm_vision_tower="openai/clip-x",
              mm_hidden_size=16, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2)
  with open(stage1 / "config.json", "w") as f:
    json.dump(conf, f)
  cli("import", "--from", "llava", stage1 / "mm_projector.bin", "--base", tmp_path / "vicuna",
      "--vision", tmp_path / "clip", "--out", tmp_path / "ck")
  cfg, p = ckpt(tmp_path / "ck")
  assert cfg.tiler.kind == "single" and cfg.tiler.resize_mode == "center_crop"
  assert cfg.image_token_id == 96  # no tokenizer: an <image> row appended
  for i, fc in ((0, "fc0"), (2, "fc1")):
    w = proj[f"model.mm_projector.{i}.weight"].astype(np.float32)
    assert np.array_equal(p[("connector", fc, "kernel")], w.T)
  q = llm.model.layers[1].self_attn.q_proj.weight.detach().numpy()
  assert np.array_equal(p[("llm", "layers", "layer", "attn", "q", "kernel")][1], q.T)
  assert np.array_equal(p[("vision", "cls")], clip.embeddings.class_embedding.detach().numpy())


def test_lora_output_matches_peft(tmp_path):
  tok, vocab = _tokenizer(tmp_path)
  ref = _ref("llava", vocab)
  base = _full_dir(tmp_path, ref, tok)
  regex = r".*language_model.*\.(q_proj|v_proj|down_proj)"
  pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=regex))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for n, prm in pm.named_parameters():
      if "lora_" in n or "multi_modal_projector" in n:  # adapters and a retrained projector
        prm.add_(torch.randn(prm.shape, generator=g) * 0.3)
  pm.eval()
  out = tmp_path / "llava-lora"
  os.makedirs(out)
  pm.peft_config["default"].save_pretrained(out)
  strip = lambda k: k[len("base_model.model."):]
  adapter = {"base_model.model." + llava_key(strip(k)): v.detach().clone()
             for k, v in peft.get_peft_model_state_dict(pm).items()}
  from safetensors.torch import save_file
  save_file(adapter, out / "adapter_model.safetensors")
  trainables = {"base_model.model." + llava_key(strip(n)): prm.detach().clone()
                for n, prm in pm.named_parameters() if "multi_modal_projector" in n}
  torch.save(trainables, out / "non_lora_trainables.bin")
  with open(out / "config.json", "w") as f:
    json.dump(llava_config(ref, str(tmp_path / "clip_tower")), f)
  cli("import", "--from", "llava", out, "--base", base, "--out", tmp_path / "ck")
  cfg, p = ckpt(tmp_path / "ck")
  assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (4, 8.0, ("q", "v", "down"))
  ids, px, sizes = _batch(cfg, vocab, np.random.default_rng(1))
  want = _hf_logits(pm, ids, px, sizes, vocab)
  got = _our_logits(tmp_path / "ck", ids, px, sizes)
  assert np.abs(got[..., :vocab] - want).max() <= 1e-4
  with torch.no_grad(), pm.disable_adapter():  # the adapters matter in this check
    plain = _hf_logits(pm, ids, px, sizes, vocab)
  assert np.abs(plain - want).max() > 1e-2


def test_llava_med_v15_imports_in_its_training_format():
  """LlavaMistralForCausalLM (LLaVA-Med v1.5) was trained in the code base's conv_mistral_instruct
  (SeparatorStyle.LLAMA_2, ' {a} </s>'), image first: it imports as llava_mistral and exports as
  a LlavaMistralForCausalLM again."""
  from convert import llava
  from data.conversation import image_position_for
  from vlm.config import VisionConfig
  d = H.llama_config(vocab=96, mistral=True).to_dict()
  d.update(model_type="llava_mistral", mm_vision_tower="tower", mm_hidden_size=16,
           mm_projector_type="mlp2x_gelu")
  cfg = llava.to_vlm(d, VisionConfig(image_size=28, patch_size=14, width=16, layers=3, heads=2,
                                     mlp_dim=32))
  assert cfg.template == "llava_mistral" and image_position_for(cfg.template) == "first"
  assert llava.from_vlm(cfg, "tower", "float32")["model_type"] == "llava_mistral"
