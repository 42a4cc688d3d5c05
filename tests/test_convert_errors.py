"""Every conversion failure is one line naming the key, file and shapes (the CLI prints
`error: ...` and exits 2): unknown architecture, missing / unexpected keys, shape mismatch, dtype
overflow, .bin without torch, unsafe pickles, S2 / LoRA / tower-only exports, a missing tower."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tests.test_convert_util import cli, hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  hf_model("llama").save_pretrained(path)
  return path


def _copy(src, dst, edit=None, config=None):
  shutil.copytree(src, dst)
  f = os.path.join(dst, "model.safetensors")
  if edit:
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
  if config:
    with open(os.path.join(dst, "config.json")) as fh:
      d = json.load(fh)
    d.update(config)
    with open(os.path.join(dst, "config.json"), "w") as fh:
      json.dump(d, fh)
  return dst


def _error(capsys, *args) -> str:
  with pytest.raises(SystemExit) as e:
    cli(*args)
  assert e.value.code == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
  assert len(err) == 1, err
  return err[0]


def test_unknown_architecture(llama_dir, tmp_path, capsys):
  src = _copy(llama_dir, tmp_path / "gpt", config={"model_type": "gpt2"})
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert "unknown architecture model_type='gpt2'" in msg


def test_llava_code_base_dir_given_as_hf(llama_dir, tmp_path, capsys):
  src = _copy(llama_dir, tmp_path / "l",
              config={"mm_vision_tower": "x", "model_type": "llava_llama"})
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "c")
  assert "is a LLaVA code-base config (mm_* keys): use --from llava" in msg


def test_missing_key(llama_dir, tmp_path, capsys):
  src = _copy(llama_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert f"missing key llm:layers.1.mlp.up_proj.weight in {src}" in msg
  assert "llm/layers/layer/mlp/up/kernel" in msg


def test_unexpected_key(llama_dir, tmp_path, capsys):
  src = _copy(llama_dir, tmp_path / "u",
              lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert f"unexpected key model.layers.0.mlp.extra.weight in {src / 'model.safetensors'}" in msg


def test_shape_mismatch(llama_dir, tmp_path, capsys):
  key = "model.layers.1.self_attn.q_proj.weight"
  src = _copy(llama_dir, tmp_path / "s", lambda t: t.update({key: np.zeros((32, 30), np.float32)}))
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert (f"shape mismatch for {key} in {src / 'model.safetensors'}: checkpoint (32, 30) vs "
          "model (32, 32)") in msg


def test_dtype_overflow(llama_dir, tmp_path, capsys):
  def big(t):
    t["model.norm.weight"][3] = 1e6
  src = _copy(llama_dir, tmp_path / "o", big)
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck",
               "--dtype", "float16")
  assert f"dtype overflow casting model.norm.weight in {src / 'model.safetensors'} (32,)" in msg
  assert "float32 to float16: |value| 1e+06 > 6.55e+04" in msg
  # bfloat16 holds 1e6: the same checkpoint converts.
  cli("import", "--from", "hf", src, "--out", tmp_path / "ck", "--dtype", "bfloat16")


def _bin_dir(llama_dir, path, extra=None):
  os.makedirs(path)
  state = {k: torch.tensor(v)
           for k, v in load_file(os.path.join(llama_dir, "model.safetensors")).items()}
  state.update(extra or {})
  torch.save(state, os.path.join(path, "pytorch_model.bin"))
  shutil.copy(os.path.join(llama_dir, "config.json"), path)
  return path


def test_bin_needs_torch(llama_dir, tmp_path, capsys, monkeypatch):
  src = _bin_dir(llama_dir, tmp_path / "b")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert "reading a pickled .bin checkpoint needs torch" in msg


class Payload:  # anything but tensors and plain containers is refused by weights_only
  pass


def test_bin_refuses_unsafe_pickle(llama_dir, tmp_path, capsys):
  src = _bin_dir(llama_dir, tmp_path / "p", {"evil": Payload()})
  msg = _error(capsys, "import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert f"refusing to unpickle {src / 'pytorch_model.bin'} (weights_only=True)" in msg


def test_bin_imports_like_safetensors(llama_dir, tmp_path):
  from tests.test_convert_util import assert_same, ckpt
  cli("import", "--from", "hf", _bin_dir(llama_dir, tmp_path / "b"), "--out", tmp_path / "a")
  cli("import", "--from", "hf", llama_dir, "--out", tmp_path / "c")
  assert_same(ckpt(tmp_path / "a")[1], ckpt(tmp_path / "c")[1])


def test_export_refusals(llama_dir, tmp_path, capsys):
  import transformers as T
  from flax.traverse_util import flatten_dict, unflatten_dict
  from vlm import hf
  from tests import hf_models as H
  from vlm import checkpoint
  from vlm.config import LoraConfig, VLMConfig
  from vlm.model import abstract_params
  cli("import", "--from", "hf", llama_dir, "--out", tmp_path / "plain")
  cfg, params = checkpoint.load(tmp_path / "plain")
  cfg = cfg.replace(lora=LoraConfig(rank=2, targets=("q",)))
  flat = flatten_dict(params)
  shapes = flatten_dict(abstract_params(cfg, boxed=False))
  flat.update({k: np.zeros(v.shape, np.float32) for k, v in shapes.items()
               if k[-1].startswith("lora_")})
  checkpoint.save(tmp_path / "lora", cfg, unflatten_dict(flat))
  msg = _error(capsys, "export", "--to", "hf", tmp_path / "lora", "--out", tmp_path / "x")
  assert f"{tmp_path / 'lora'} has LoRA adapters (rank 2): pass --lora merge" in msg
  msg = _error(capsys, "export", "--to", "peft", tmp_path / "plain", "--out", tmp_path / "y")
  assert "no LoRA adapters (lora.rank = 0)" in msg
  msg = _error(capsys, "export", "--to", "llava", tmp_path / "plain", "--out", tmp_path / "z")
  assert "--to llava needs a vision model" in msg
  clip = H.build(T.CLIPVisionModel, H.clip_config())
  tower = VLMConfig(vision=hf.vision_config(clip.config.to_dict()))
  params = hf.import_weights(tower, {hf.canonical_name(k): v.numpy()
                                     for k, v in clip.state_dict().items()}, components=("vision",))
  checkpoint.save(tmp_path / "tower", tower, params)
  msg = _error(capsys, "export", "--to", "hf", tmp_path / "tower", "--out", tmp_path / "w")
  assert "is a tower-only checkpoint" in msg


def test_llava_without_a_tower(tmp_path, capsys):
  m = hf_model("llama")
  m.save_pretrained(tmp_path / "vicuna")
  os.makedirs(tmp_path / "s1")
  torch.save({"model.mm_projector.weight": torch.zeros(32, 16)},
             tmp_path / "s1" / "mm_projector.bin")
  with open(tmp_path / "s1" / "config.json", "w") as f:
    json.dump(dict(m.config.to_dict(), model_type="llava_llama", mm_hidden_size=16,
                   mm_vision_tower="/nowhere/clip"), f)
  msg = _error(capsys, "import", "--from", "llava", tmp_path / "s1", "--base", tmp_path / "vicuna",
               "--out", tmp_path / "ck")
  assert "cannot find the vision tower mm_vision_tower='/nowhere/clip'; pass --vision DIR" in msg
