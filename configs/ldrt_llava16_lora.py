"""LDRT assistant: LoRA fine-tuning of LLaVA v1.6-vicuna-13B ("anyres" tiles); the same recipe as
ldrt_llava15_lora.py (papers/ldrt-llava-lora_arxiv-2501.15370.md Sec. 4)."""
from configs import ldrt_llava15_lora


def get_config():
  c = ldrt_llava15_lora.get_config()
  c.name = "ldrt_llava16_lora"
  c.model.init = "checkpoints/llava-v1.6-vicuna-13b-hf"   # HF llava-hf/llava-v1.6-vicuna-13b-hf
  c.model.preset = "llava16_vicuna_13b"
  # anyres training is LLaVA-NeXT's code (haotian-liu/LLaVA's train.py has no anyres): its
  # preprocess_multimodal leaves a turn that starts with <image>, and its whitespace, as it is
  c.data.image_position = "first_next"
  return c
