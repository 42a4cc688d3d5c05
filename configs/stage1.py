"""Llama3-Med stage 1, connector alignment (papers/llama3-med_arxiv-2406.09454.md).

The DFN5B CLIP tower and Llama-3-8B-Instruct stay frozen; only the mlp2x_gelu connector trains
(App. D: "integrate a frozen pretrained vision encoder with a frozen large language model").
Start from the composed checkpoint:
  python -m convert import --llm Meta-Llama-3-8B-Instruct --vision DFN5B-CLIP-ViT-H-14-378 \
      --preset llama3_med --out checkpoints/llama3_med_init
"""
from configs import common


def get_config():
  c = common.base()
  c.name = "llama3_med_stage1"
  c.model.init = "checkpoints/llama3_med_init"
  c.model.preset = "llama3_med"
  c.model.loss_chunk = 512          # 128k vocabulary: no full-sequence float32 logits
  c.trainable = (r"^connector/",)   # App. D: vision encoder and LLM frozen
  # App. D: "a subset of 600K images from the PMC-15M dataset" = LLaVA-Med's alignment set.
  c.data.paths = ("data/llava_med/llava_med_alignment_500k.json",)
  c.data.image_root = "data/llava_med/images"
  c.data.template = "plain"         # LLaVA pretraining format: <image>{caption}\n
  c.data.max_len = 2048             # Table 8: Max Length 2048
  c.data.global_batch = 256         # Table 8: Global Batch Size 256 (Sec. 4 Implementation details)
  c.optim.lr = 1e-3                 # Table 8: Learning Rate 1e-3
  c.optim.schedule = "cosine"       # Sec. 4 Implementation details: cosine scheduler, AdamW
  c.optim.warmup_ratio = 0.03       # Table 8: Warmup Ratio 0.03
  c.optim.weight_decay = 0.0        # Table 8: Weight Decay 0
  c.train.epochs = 1                # Table 8: Epochs 1
  # Memory knob, not a paper number (App. D: per-device batch x accumulation x GPUs = global
  # batch): 8 micro-batches of 32, i.e. 8 per device on the paper's 4 H100s.
  c.optim.grad_accum = 8
  c.checkpoint.every = 500
  return c
