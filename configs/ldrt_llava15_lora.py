"""LDRT assistant: LoRA fine-tuning of LLaVA v1.5-13B (papers/ldrt-llava-lora_arxiv-2501.15370.md).

Sec. 4 (Experiment and Result): initialized from the instruction-tuned LLaVA checkpoint; 1 epoch on
50,882 entries; batch size 16 (4 per GPU x 4 GPUs); lr 2e-4 with cosine decay; LoRA r=128,
alpha=256 "for both the vision module and the base model"; the 2-layer MLP projector trained with
lr 2e-5; 3% warm-up; max sequence length 2048. Weight decay is not stated (LLaVA's default, 0).
Sec. 3.2 says the instruction stage keeps the vision encoder frozen; Sec. 4's LoRA on "the vision
module" is followed here (the adapters train, the tower's own weights stay frozen). Sec. 3.3: ZeRO-3
(here: the fsdp mesh axis), gradient checkpointing (remat), FlashAttention-2 (attention=auto).
"""
from configs import common


def get_config():
  c = common.base()
  c.name = "ldrt_llava15_lora"
  c.model.init = "checkpoints/llava-1.5-13b-hf"     # HF llava-hf/llava-1.5-13b-hf, read directly
  c.model.preset = "llava15_13b"
  # Sec. 4: r=128, alpha=256 on the vision module and the base model. Dropout 0.05: not in the
  # paper, LLaVA's finetune_lora.sh default.
  common.lora(c, rank=128, alpha=256.0, dropout=0.05, vision=True)
  # `python -m data.ldrt --out-dir data/ldrt` output: train.json (97% of the articles) and
  # eval.json (the other 3%, Sec. 3.1); images as `data.ldrt --image-root` found them.
  c.data.paths = ("data/ldrt/train.json",)
  c.data.image_root = "data/ldrt/images"
  c.data.max_len = 2048             # Sec. 4: maximum sequence length 2048
  # The LLaVA code base's format (the model's template, vicuna_v1): LLaVA train.py
  # preprocess_multimodal moves <image> to the front of its turn ("<image>\n" + the question).
  c.data.template = None
  c.data.image_position = "first"
  c.data.global_batch = 16          # Sec. 4: batch size 16 (4 per GPU x 4 GPUs)
  c.eval.paths = ("data/ldrt/eval.json",)           # held-out loss on Sec. 3.1's 3% split
  c.eval.every = 500
  c.optim.lr = 2e-4                 # Sec. 4: learning rate 2e-4
  c.optim.schedule = "cosine"       # Sec. 4: cosine decay
  c.optim.warmup_ratio = 0.03       # Sec. 4: 3% warmup ratio
  c.optim.groups = {"connector": dict(pattern=r"^connector/", lr=2e-5)}   # Sec. 4: projector
  c.optim.weight_decay = 0.0        # not stated; LLaVA default
  c.train.epochs = 1                # Sec. 4: 1 epoch
  c.optim.grad_accum = 1
  c.checkpoint.every = 500
  return c
