"""The independent oracle of every generation test: for every new token a full forward over the
prompt and the tokens so far (`model.apply`, no KV cache, no engine), argmax, up to a stop token
or `n` tokens."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import vlm
from data.conversation import stop_token_ids
from data.tokenizer import load_tokenizer


@functools.lru_cache(maxsize=None)
def loaded(ckpt):
  model, params = vlm.from_pretrained(ckpt)
  return model, params, load_tokenizer(ckpt)


_FORWARD: dict = {}


def _forward(model):
  """logits of ids [1, T] whose first m are the prompt: image features go to the prompt's
  placeholders only (a generated image-token id is a plain token, as in HF's generate, whose
  pixels reach the prefill alone)."""
  def logits(mod, x, px, sizes, m):
    h = mod.embed(x, px, sizes)
    h = jnp.where((jnp.arange(x.shape[1]) < m)[None, :, None], h, mod.llm.embed(x))
    return mod.llm(h, jnp.arange(x.shape[1])[None])

  if id(model) not in _FORWARD:
    _FORWARD[id(model)] = (model, jax.jit(lambda p, x, px, sizes, m: model.apply(
        {"params": p}, x, px, sizes, m, method=logits)))
  return _FORWARD[id(model)][1]


def greedy_tokens(model, params, prompt, n: int, stops=()) -> list:
  """Token ids (stop token excluded). The unfilled tail comes after the read position, so causal
  attention never sees it; every prompt padded to the model's context: one program (with images
  or without) serves every prompt."""
  m, pad = len(prompt.ids), 0 if model.config.image_token_id != 0 else 1
  ids = np.full((1, max(m + n, model.config.llm.max_positions)), pad, np.int32)
  ids[0, :m] = prompt.ids
  px = None if prompt.pixels is None else prompt.pixels[None]
  sizes = None if prompt.image_sizes is None else prompt.image_sizes[None]
  f, out = _forward(model), []
  for i in range(n):
    t = int(np.argmax(np.asarray(f(params, ids, px, sizes, m))[0, m + i - 1]))
    if t in stops:
      break
    out.append(t)
    ids[0, m + i] = t
  return out


def greedy_answer(ckpt, prompt, n: int) -> str:
  """The answer text as the CLIs print it (template stop tokens apply)."""
  model, params, tok = loaded(ckpt)
  out = greedy_tokens(model, params, prompt, n, stop_token_ids(tok, model.config.template))
  return tok.decode(out, skip_special_tokens=True).strip()
