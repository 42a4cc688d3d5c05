"""Llama3-Med stage 2, visual instruction tuning of connector + LLM (papers/llama3-med...md).

Starts from stage 1's output (its workdir stands for WORKDIR/final). The tower stays frozen; the
connector and the whole LLM train (App. D "visual instruction tuning").
"""
from configs import common, stage1
from data import conversation


def get_config():
  c = stage1.get_config()
  c.name = "llama3_med_stage2"
  c.model.init = "runs/llama3_med_stage1"
  c.trainable = (r"^connector/", r"^llm/")
  # App. D: 60K LLaVA-Med instruction samples + ~20K QA pairs synthesized from PMC-15M
  # (`python -m data.synth`).
  c.data.paths = ("data/llava_med/llava_med_instruct_60k_inline_mention.json",
                  "data/llama3_med/synth_20k.json")
  c.data.template = None            # the model's: llama3
  # The prompt format of Llama3-Med's code (github standardmodelbio/Llama3-Med): base.py renders the
  # question as the data has it (<image> kept in place; the move to the front is commented out) and
  # llama3_template.py always renders its system block with this prompt.
  c.data.image_position = "keep"
  c.data.system = conversation.LLAMA3_MED_SYSTEM
  c.data.max_len = 2048             # Table 9: Max Length 2048
  c.data.global_batch = 128         # Table 9: Global Batch Size 128 (Sec. 4)
  c.optim.lr = 2e-5                 # Table 9: Learning Rate 2e-5 (Sec. 4)
  c.optim.schedule = "cosine"       # Sec. 4: cosine scheduler, AdamW
  c.optim.warmup_ratio = 0.03       # Table 9: Warmup Ratio 0.03
  c.optim.weight_decay = 0.0        # Table 9: Weight Decay 0
  c.train.epochs = 1                # Table 9: Epochs 1
  c.optim.grad_accum = 8            # memory knob: 8 micro-batches of 16
  return c


del common
