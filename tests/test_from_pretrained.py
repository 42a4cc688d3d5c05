"""`import vlm; vlm.from_pretrained(hf_dir)` with nothing else imported: a HF Llama (Llama-3 rope,
GQA, untied head) and a HF Llava-1.5 dir load in a fresh interpreter that imports only vlm (no
convert, no data above it), and their float32 logits match transformers' within 1e-4. (The other
decoder and anyres parity cases run in-process: tests/test_llama.py, tests/test_llava.py.)"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import torch
import transformers as T

from tests import hf_models as H

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMG = 95  # <image> id in the tiny vocab
ABOVE_VLM = ("data", "convert", "serve", "train", "evaluation")

# A fresh interpreter: imports vlm alone, loads each dir, writes its logits.
SCRIPT = """
import sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp
import numpy as np
import vlm
x = np.load(sys.argv[1])
i32 = lambda a: jnp.asarray(a, jnp.int32)
model, params = vlm.from_pretrained(sys.argv[2])
assert not model.config.llm.tie_embeddings and model.config.vision is None
out = {"llama": model.apply({"params": params}, i32(x["llama_ids"]), positions=i32(x["positions"]),
                            segment_ids=i32(x["segments"]))}
model, params = vlm.from_pretrained(sys.argv[3])
assert model.config.image_tokens() == 4
out["llava"] = model.apply({"params": params}, i32(x["llava_ids"]), jnp.asarray(x["pixels"])[:, None])
out["text_only"] = model.apply({"params": params}, i32(x["llava_ids"][:, :1]))  # same params
above = sorted(m for m in sys.modules if m.split(".")[0] in %r)
assert not above, f"vlm.from_pretrained imported {above}"
np.savez(sys.argv[4], **{k: np.asarray(v) for k, v in out.items()})
""" % (ABOVE_VLM,)


def _row(rng, before, after):
  return np.concatenate([H.rand_ids(rng, (before,), 96, avoid=(IMG,)), np.full(4, IMG),
                         H.rand_ids(rng, (after,), 96, avoid=(IMG,))])


def test_hf_dirs_load_with_vlm_alone(tmp_path):
  llama_dir, llava_dir = tmp_path / "llama", tmp_path / "llava"
  llama = H.build(T.LlamaForCausalLM, H.llama_config(rope=H.LLAMA3_ROPE), llama_dir)
  llava = H.build(T.LlavaForConditionalGeneration,
                  T.LlavaConfig(vision_config=H.clip_config(), text_config=H.llama_config(),
                                image_token_index=IMG, vision_feature_layer=-2), llava_dir)
  rng = np.random.default_rng(0)
  ids = H.rand_ids(rng, (2, 24), 96)
  # Right-padded batch: row 1 has 7 pad tokens; explicit positions starting at 3 (row 0) and 0.
  mask = np.ones((2, 24), np.int64)
  mask[1, 17:] = 0
  pos = np.stack([np.arange(24) + 3, np.arange(24)])
  vl = np.stack([_row(rng, 1, 9), _row(rng, 8, 2)])   # the image before / after the question
  px = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
  np.savez(tmp_path / "in.npz", llama_ids=ids, positions=pos, segments=mask, llava_ids=vl,
           pixels=px)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "in.npz"), str(llama_dir),
                          str(llava_dir), str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  with torch.no_grad():   # the references, while the subprocess starts
    want = {"llama": H.to_np(llama(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   position_ids=torch.tensor(pos)).logits),
            "llava": H.to_np(llava(input_ids=torch.tensor(vl),
                                   pixel_values=torch.tensor(px).permute(0, 3, 1, 2)).logits)}
  _, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-3000:]
  got = np.load(tmp_path / "out.npz")
  valid = {"llama": mask.astype(bool)[..., None], "llava": True}
  for name in want:
    assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
    diff = np.abs(got[name] - want[name])
    assert np.where(valid[name], diff, 0).max() <= 1e-4, (name, diff.max())
    assert np.abs(want[name]).max() > 0.1   # not trivially small logits
  assert got["text_only"].shape == (2, 1, 96)
