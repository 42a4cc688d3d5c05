"""peft adapters both ways. `--to peft`: one `PeftModel.from_pretrained` on the original HF base
gives our logits (LoRA unmerged, the trained connector a modules_to_save module), and
`--from peft` of that dir gives our checkpoint back bit for bit; `--names llava` writes the LLaVA
code-base LoRA layout. `--from peft`: adapters made by peft itself (every projection, rank /
alpha patterns, rsLoRA, layers without adapters, modules_to_save copies) give PeftModel's logits.
`--to hf --lora merge` / `merge-lora` fold the adapters in."""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from tests import hf_models as H
from tests.test_convert import CLASSES
from tests.test_convert_errors import _error
from tests.test_convert_util import IMG, assert_same, ckpt, cli, hf_model, llava_key, st_tensors
from vlm import checkpoint
from vlm.config import LoraConfig
from vlm.model import VLM, abstract_params

WRAP = "base_model.model."
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_ckpt(kind, tmp_path):
  """Import a tiny HF model (kept in src/) and give it random adapters and a changed connector."""
  hf_model(kind).save_pretrained(tmp_path / "src")
  cli("import", "--from", "hf", tmp_path / "src", "--out", tmp_path / "plain")
  cfg, params = checkpoint.load(tmp_path / "plain")
  vision = ("q", "fc1") if cfg.vision is not None else ()
  cfg = cfg.replace(lora=LoraConfig(rank=4, alpha=8, targets=("q", "v", "down"),
                                    vision_targets=vision))
  flat = flatten_dict(params)
  rng = np.random.default_rng(0)
  for k, v in flatten_dict(abstract_params(cfg, boxed=False)).items():
    if k[-1].startswith("lora_"):
      flat[k] = (rng.normal(size=v.shape) * 0.3).astype(np.float32)
    elif k[0] in ("connector", "image_newline"):
      flat[k] = np.asarray(flat[k]) + rng.normal(size=v.shape).astype(np.float32) * 0.1
  checkpoint.save(tmp_path / "lora", cfg, unflatten_dict(flat))
  return cfg, unflatten_dict(flat)


def _inputs(cfg, rng):
  """(ids, pixels, image sizes) for our model; HF takes the same arrays re-laid out in _hf."""
  if cfg.vision is None:
    return H.rand_ids(rng, (2, 10), 96, avoid=(IMG,)), None, None
  anyres = cfg.tiler.kind == "anyres"
  n = cfg.image_tokens((30, 50)) if anyres else cfg.image_tokens()
  ids = H.rand_ids(rng, (2, n + 8), 96, avoid=(IMG,))
  ids[:, 2:2 + n] = IMG
  if anyres:
    px = rng.normal(size=(2, 1, cfg.tiler.max_tiles(cfg.vision), 28, 28, 3))
    return ids, px.astype(np.float32), np.array([[(30, 50)]] * 2)
  return ids, rng.normal(size=(2, 1, 28, 28, 3)).astype(np.float32), None


def _hf(model, ids, px, sizes):
  kw = {"input_ids": torch.tensor(ids)}
  if sizes is not None:
    kw.update(pixel_values=torch.tensor(px[:, 0]).permute(0, 1, 4, 2, 3),
              image_sizes=torch.tensor(sizes[:, 0]))
  elif px is not None:
    kw["pixel_values"] = torch.tensor(px[:, 0]).permute(0, 3, 1, 2)
  with torch.no_grad():
    return H.to_np(model(**kw).logits)


def _ours(cfg, params, ids, px, sizes):
  args = (jnp.asarray(ids, jnp.int32),) + (() if px is None else (jnp.asarray(px),))
  run = jax.jit(lambda p: VLM(cfg).apply({"params": p}, *args, image_sizes=sizes))
  return np.asarray(run(params))


@pytest.mark.parametrize("kind", ["llama", "llava", "llava_next"])
def test_peft_export_loads_on_the_hf_base_and_round_trips(kind, tmp_path):
  cfg, params = _lora_ckpt(kind, tmp_path)
  ids, px, sizes = _inputs(cfg, np.random.default_rng(1))
  ours = _ours(cfg, params, ids, px, sizes)

  cli("export", "--to", "peft", tmp_path / "lora", "--out", tmp_path / "adapter",
      "--base", tmp_path / "src")
  base = CLASSES[kind].from_pretrained(tmp_path / "src")
  model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  got = _hf(model, ids, px, sizes)
  assert np.abs(got - ours).max() <= 1e-4
  with model.disable_adapter():  # adapters (and the connector) are in play
    assert np.abs(_hf(model, ids, px, sizes) - ours).max() > 1e-2

  cli("import", "--from", "peft", tmp_path / "adapter", "--out", tmp_path / "back")  # base: recorded
  back_cfg, back = ckpt(tmp_path / "back")
  assert back_cfg == cfg
  assert_same(back, ckpt(tmp_path / "lora")[1])

  if kind != "llama":
    return
  cli("export", "--to", "hf", tmp_path / "lora", "--lora", "merge", "--out", tmp_path / "merged_hf")
  merged = CLASSES[kind].from_pretrained(tmp_path / "merged_hf")
  assert np.abs(_hf(merged, ids, px, sizes) - ours).max() <= 1e-4
  cli("merge-lora", tmp_path / "lora", "--out", tmp_path / "merged")
  mcfg, mparams = checkpoint.load(tmp_path / "merged")
  assert mcfg.lora.rank == 0 and not any(k[-1].startswith("lora_") for k in flatten_dict(mparams))
  q = params["llm"]["layers"]["layer"]["attn"]["q"]
  want = q["kernel"] + np.einsum("lir,lro->lio", q["lora_a"], q["lora_b"]) * cfg.lora.scale
  got = np.asarray(mparams["llm"]["layers"]["layer"]["attn"]["q"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_peft_export_llava_names(tmp_path):
  """--names llava: the keys LLaVA's train.py saves (independent transcription: llava_key), a
  target regex that selects exactly the adapted modules, and a round trip through --from llava."""
  cfg, params = _lora_ckpt("llava", tmp_path)
  cli("export", "--to", "llava", tmp_path / "lora", "--lora", "base", "--out", tmp_path / "lbase")
  cli("export", "--to", "peft", tmp_path / "lora", "--names", "llava", "--base", tmp_path / "lbase",
      "--out", tmp_path / "llava_lora")
  cli("export", "--to", "peft", tmp_path / "lora", "--out", tmp_path / "hf_lora")
  hf_keys = st_tensors(tmp_path / "hf_lora")
  got = st_tensors(tmp_path / "llava_lora")
  lora = {WRAP + llava_key(k[len(WRAP):]): v for k, v in hf_keys.items() if ".lora_" in k}
  assert set(got) == set(lora) and all(torch.equal(got[k], lora[k]) for k in lora)
  trained = torch.load(tmp_path / "llava_lora" / "non_lora_trainables.bin", weights_only=True)
  want = {WRAP + llava_key(k[len(WRAP):]): v for k, v in hf_keys.items() if ".lora_" not in k}
  assert set(trained) == set(want) and all(torch.equal(trained[k], want[k]) for k in want)
  assert all(k.startswith(WRAP + "model.mm_projector.") for k in trained)
  with open(tmp_path / "llava_lora" / "adapter_config.json") as f:
    conf = json.load(f)
  adapted = {re.sub(r"\.lora_[AB]\.weight$", "", k[len(WRAP):]) for k in got}
  others = {re.sub(r"\.(q|v)_proj\.", ".k_proj.", m) for m in adapted}
  assert all(re.fullmatch(conf["target_modules"], m) for m in adapted)
  assert not any(re.fullmatch(conf["target_modules"], m) for m in others - adapted)
  assert conf["modules_to_save"] is None
  with open(tmp_path / "llava_lora" / "config.json") as f:
    assert json.load(f)["mm_vision_tower"] == str(tmp_path / "lbase" / "vision_tower")
  cli("import", "--from", "llava", tmp_path / "llava_lora", "--base", tmp_path / "lbase",
      "--out", tmp_path / "back")
  back_cfg, back = ckpt(tmp_path / "back")
  assert back_cfg.lora == cfg.lora
  assert_same(back, ckpt(tmp_path / "lora")[1])


# kind, HF model options, peft LoraConfig options (r=4, lora_alpha=8 unless given)
ADAPTERS = {
    "llama": ("llama", {}, dict(
        target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj)|.*layers\.1\.mlp\.down_proj",
        rank_pattern={"down_proj": 2, r"layers\.0\.self_attn\.k_proj": 6},
        alpha_pattern={"v_proj": 3}, modules_to_save=["embed_tokens", "lm_head"])),
    "llama_tied_rslora": ("llama", {"tie": True}, dict(
        target_modules=ALL7, use_rslora=True, lora_alpha=5, modules_to_save=["lm_head"])),
    "llava": ("llava", {}, dict(
        target_modules=["q_proj", "v_proj", "fc1", "down_proj"],
        modules_to_save=["multi_modal_projector", "lm_head"])),
    "llava_next": ("llava_next", {}, dict(
        target_modules=r".*language_model.*\.(q_proj|k_proj|o_proj|up_proj)", r=3,
        modules_to_save=["multi_modal_projector", "embed_tokens"])),
}


def _peft_adapter(tmp_path, kind, model_kw, lora_kw, seed=0):
  """A tiny HF base in base/ and peft's own save_pretrained of a perturbed adapter in adapter/."""
  model = hf_model(kind, **model_kw)
  model.save_pretrained(tmp_path / "base")
  pm = peft.get_peft_model(model, peft.LoraConfig(**dict(dict(r=4, lora_alpha=8), **lora_kw)))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n or "modules_to_save" in n:  # lora_B starts at 0: make every part count
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
  pm.save_pretrained(tmp_path / "adapter")
  return pm.eval()


@pytest.mark.parametrize("case", sorted(ADAPTERS))
def test_peft_import_matches_peft(case, tmp_path):
  kind, model_kw, lora_kw = ADAPTERS[case]
  pm = _peft_adapter(tmp_path, kind, model_kw, lora_kw)
  cli("import", "--from", "peft", tmp_path / "adapter", "--base", tmp_path / "base",
      "--out", tmp_path / "ck")
  cfg, params = checkpoint.load(tmp_path / "ck")
  ids, px, sizes = _inputs(cfg, np.random.default_rng(1))
  want = _hf(pm, ids, px, sizes)
  assert np.abs(_ours(cfg, params, ids, px, sizes) - want).max() <= 1e-4
  with pm.disable_adapter():
    assert np.abs(_hf(pm, ids, px, sizes) - want).max() > 1e-2
  if case == "llama":  # the largest rank of the patterns; scales folded into lora_B
    assert (cfg.lora.rank, cfg.lora.targets) == (6, ("q", "k", "v", "o", "gate", "up", "down"))
  if case == "llama_tied_rslora":
    assert not cfg.llm.tie_embeddings  # the lm_head copy unties the pair
  if kind != "llama":
    assert cfg.lora.vision_targets == (("q", "v", "fc1") if kind == "llava" else ())


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("peft")
  _peft_adapter(path, "llama", {}, dict(target_modules=["q_proj"]))
  return path


@pytest.mark.parametrize("option, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"lora_bias": True}, "lora_bias=True is not supported"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' rewrites the base weights"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
    ({"rank_pattern": {"q_proj": 2}}, "rank 4 but"),
])
def test_peft_import_refuses(option, message, adapter_dir, tmp_path, capsys):
  shutil.copytree(adapter_dir / "adapter", tmp_path / "a")
  with open(tmp_path / "a" / "adapter_config.json") as f:
    d = json.load(f)
  with open(tmp_path / "a" / "adapter_config.json", "w") as f:
    json.dump(dict(d, **option), f)
  msg = _error(capsys, "import", "--from", "peft", tmp_path / "a", "--base", adapter_dir / "base",
               "--out", tmp_path / "ck")
  assert message in msg


def test_peft_import_needs_a_base_and_supported_targets(adapter_dir, tmp_path, capsys):
  msg = _error(capsys, "import", "--from", "peft", adapter_dir / "adapter", "--out", tmp_path / "c")
  assert "--from peft needs --base HF_DIR" in msg
  _peft_adapter(tmp_path, "llama", {}, dict(target_modules=["q_proj", "lm_head"]))
  msg = _error(capsys, "import", "--from", "peft", tmp_path / "adapter", "--base",
               tmp_path / "base", "--out", tmp_path / "c")
  assert "LoRA on base_model.model.lm_head.lora_A.weight is not supported" in msg
