"""A tiny text-only training config for tests/test_aot.py: one decoder layer of Llama shape (head
dim 128, what the fused attention kernels tile by), LoRA off, bf16, remat full, attention auto."""
from configs import common


def get_config():
  c = common.base()
  c.name = "aot_tiny"
  c.model.init = "scratch"
  c.model.arch = dict(
      llm=dict(vocab_size=512, hidden=256, layers=1, heads=2, kv_heads=1, head_dim=128,
               mlp_dim=512, max_positions=512, rope_theta=10000.0),
      vision=None, image_token_id=511, template="llama3")
  c.model.update(dtype="bfloat16", frozen_dtype="bfloat16", remat="full", attention="auto")
  c.trainable = (r"^llm/",)
  c.data.update(max_len=256, global_batch=8, max_images_per_row=0)
  c.optim.grad_accum = 1
  c.train.steps = 10
  return c
