"""Tiny random HF PyTorch reference models, built in the tests (no hub)."""
from __future__ import annotations

import numpy as np
import torch
import transformers as T

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def llama_config(*, vocab=96, tie=False, rope=None, mistral=False, layers=2, **kw):
  args = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
              tie_word_embeddings=tie, rms_norm_eps=1e-5)
  args.update(kw)
  if mistral:
    return T.MistralConfig(sliding_window=None, rope_parameters=rope or {"rope_type": "default", "rope_theta": 1e6}, **args)
  return T.LlamaConfig(rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0}, **args)


def clip_config(*, act="quick_gelu", image_size=28, patch=14, layers=3, width=16):
  return T.CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=width,
                            intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=2, hidden_act=act, projection_dim=width)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2):
  """HF inits norms to 1/0 and some biases to 0: perturb every tensor so nothing matches by luck."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def build(cls, config, path=None, seed=0):
  torch.manual_seed(seed)
  model = randomize(cls(config).float(), seed)
  if path is not None:
    model.save_pretrained(path)
  return model


def to_np(t):
  return t.detach().float().numpy()


def rand_ids(rng: np.random.Generator, shape, vocab, avoid=()):
  ids = rng.integers(0, vocab, size=shape)
  for a in avoid:
    ids[ids == a] = (a + 1) % vocab
  return ids
