"""Tiny demo: a small model created from scratch, stage 1 (connector alignment) then stage 2
(LoRA instruction tuning), on real biomedical images bundled in installed packages (CT and MR from
pydicom, fundus and immunohistochemistry from scikit-image; data/demo_data.py), on CPU in minutes.

  python -m train.main --config configs/demo.py --workdir runs/demo

Same recipe shape as Llama3-Med (S2 tiler, mlp2x_gelu, Llama-3 template; stage 1 on `plain`
captions, stage 2 on conversations), scaled down: the learning rates and step counts are the
demo's own, picked so both losses fall within minutes; the papers' numbers live in the other files.
`train.demo.prepare` writes the data and the tokenizer under WORKDIR/data first.
"""
from __future__ import annotations

import ml_collections

from configs import common

ARCH = dict(
    llm=dict(vocab_size=0, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128,
             max_positions=256, rope_theta=10000.0),
    vision=dict(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_dim=64,
                select_layer=-1),
    tiler=dict(kind="s2", scales=(28, 56), resize_mode="squash"),
    connector=dict(kind="mlp2x_gelu"), image_token_id=-1, template="llama3")


def stage(name: str) -> ml_collections.ConfigDict:
  c = common.base()
  c.name = f"demo_{name}"
  c.model.dtype, c.model.frozen_dtype, c.model.remat, c.model.attention = (
      "float32", "", "none", "xla")
  c.data.update(tokenizer_dir="{workdir}/data/tokenizer", image_root="{workdir}/data",
                max_len=96, global_batch=16, mode="pad", pad_buckets=(96,), group_window=4,
                read_threads=1)
  c.eval.update(paths=(f"{{workdir}}/data/{name}_eval.json",), every=40, batches=0)
  c.data.paths = (f"{{workdir}}/data/{name}_train.json",)
  c.optim.update(schedule="cosine", warmup_ratio=0.03, clip_norm=1.0, grad_accum=2)
  c.train.update(epochs=12, log_every=20)
  c.checkpoint.update(every=40, keep=2)
  return c


def get_config() -> ml_collections.ConfigDict:
  s1 = stage("stage1")
  s1.model.init = "scratch"
  s1.model.arch = ARCH
  s1.data.template = "plain"
  s1.data.max_len, s1.data.pad_buckets = 48, (48,)
  # A random LLM's frozen output layer caps its logits near +-1 (loss ~ ln(vocab) at best), so
  # the from-scratch demo also trains the embeddings, final norm and LM head in stage 1.
  s1.trainable = (r"^connector/", r"^llm/(embed|norm|lm_head)")
  s1.optim.lr = 1e-2

  s2 = stage("stage2")
  s2.model.init = "{workdir}/stage1"   # stage 1's output (its final/ checkpoint)
  # LoRA on every decoder projection + the connector, as the LDRT recipe; the embeddings, final norm
  # and LM head of this from-scratch LLM train too (stage 1 only saw caption words in them).
  common.lora(s2, rank=16, alpha=32.0, dropout=0.0)
  s2.trainable = s2.trainable + (r"^llm/(embed|norm|lm_head)",)
  s2.optim.lr = 3e-3

  c = ml_collections.ConfigDict()
  c.name = "demo"
  c.prepare = "train.demo:prepare"
  c.chain = ("stage1", "stage2")
  c.stage1, c.stage2 = s1, s2
  return c
