"""Llama3-Med stage 2 with LoRA instead of full fine-tuning.

Stage 2's data and schedule (Table 9: global batch 128, 1 epoch, max length 2048, warmup 0.03,
cosine, wd 0) with the LoRA recipe of papers/ldrt-llava-lora_arxiv-2501.15370.md Sec. 4
("Training details"): r=128, alpha=256 on every decoder projection, lr 2e-4, projector lr 2e-5.
The Llama3-Med paper itself trains stage 2 in full (configs/stage2.py).
"""
from configs import common, stage2


def get_config():
  c = stage2.get_config()
  c.name = "llama3_med_stage2_lora"
  # LDRT Sec. 4: LoRA r=128, alpha=256. Dropout 0.05 is not in either paper: LLaVA's
  # scripts/v1_5/finetune_lora.sh default.
  common.lora(c, rank=128, alpha=256.0, dropout=0.05)
  c.optim.lr = 2e-4                 # LDRT Sec. 4: learning rate 2e-4 with cosine decay
  c.optim.groups = {"connector": dict(pattern=r"^connector/", lr=2e-5)}   # LDRT: projector 2e-5
  c.optim.grad_accum = 4            # memory knob: LoRA keeps no LLM optimizer state
  return c
