"""`--to peft`: peft loads our adapter on the `--to hf --lora base` export and gives our logits
(LoRA unmerged); `--to hf --lora merge` gives the same model with the adapters folded in, as
`merge-lora` does to a checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.torch import load_file

from tests import hf_models as H
from tests.test_convert_util import IMG, cli, hf_model
from tests.test_convert import CLASSES
from vlm import checkpoint
from vlm.config import LoraConfig
from vlm.model import VLM, abstract_params


def _lora_ckpt(kind, tmp_path):
  """Import a tiny HF model and give it random adapters (and a changed connector) -> dir."""
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
    elif k[0] == "connector":
      flat[k] = np.asarray(flat[k]) + rng.normal(size=v.shape).astype(np.float32) * 0.1
  checkpoint.save(tmp_path / "lora", cfg, unflatten_dict(flat))
  return cfg, unflatten_dict(flat)


def _inputs(cfg, rng):
  ids = H.rand_ids(rng, (2, 10), 96, avoid=(IMG,))
  if cfg.vision is None:
    return ids, None
  ids[:, 2:2 + cfg.image_tokens()] = IMG
  return ids, rng.normal(size=(2, 1, 28, 28, 3)).astype(np.float32)


def _hf(model, ids, px):
  kw = {"input_ids": torch.tensor(ids)}
  if px is not None:
    kw["pixel_values"] = torch.tensor(px[:, 0]).permute(0, 3, 1, 2)
  with torch.no_grad():
    return H.to_np(model(**kw).logits)


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_peft_adapter_and_merge(kind, tmp_path):
  cfg, params = _lora_ckpt(kind, tmp_path)
  ids, px = _inputs(cfg, np.random.default_rng(1))
  args = (jnp.asarray(ids, jnp.int32),) + (() if px is None else (jnp.asarray(px),))
  ours = np.asarray(jax.jit(lambda p: VLM(cfg).apply({"params": p}, *args))(params))

  cli("export", "--to", "hf", tmp_path / "lora", "--lora", "base", "--out", tmp_path / "base")
  cli("export", "--to", "peft", tmp_path / "lora", "--out", tmp_path / "adapter")
  base = CLASSES[kind].from_pretrained(tmp_path / "base")
  if kind == "llava":  # the trained connector travels beside the adapter
    res = base.load_state_dict(load_file(tmp_path / "adapter" / "non_lora_trainables.safetensors"),
                               strict=False)
    assert not res.unexpected_keys
  plain = _hf(base, ids, px)
  model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  got = _hf(model, ids, px)
  assert np.abs(got - ours).max() <= 1e-4
  assert np.abs(plain - ours).max() > 1e-2  # the adapters are in play

  if kind == "llava":
    return
  cli("export", "--to", "hf", tmp_path / "lora", "--lora", "merge", "--out", tmp_path / "merged_hf")
  merged = CLASSES[kind].from_pretrained(tmp_path / "merged_hf")
  assert np.abs(_hf(merged, ids, px) - ours).max() <= 1e-4
  cli("merge-lora", tmp_path / "lora", "--out", tmp_path / "merged")
  mcfg, mparams = checkpoint.load(tmp_path / "merged")
  assert mcfg.lora.rank == 0 and not any(k[-1].startswith("lora_") for k in flatten_dict(mparams))
  q = params["llm"]["layers"]["layer"]["attn"]["q"]
  want = q["kernel"] + np.einsum("lir,lro->lio", q["lora_a"], q["lora_b"]) * cfg.lora.scale
  got = np.asarray(mparams["llm"]["layers"]["layer"]["attn"]["q"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
