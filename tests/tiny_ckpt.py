"""Tiny checkpoints of this project for command-line tests (no hub): a random HF Llava with a
vocabulary sized to a tiny tokenizer, imported with vlm.from_pretrained and written with
vlm.checkpoint.save, tokenizer in CKPT/tokenizer.

  from tests.tiny_ckpt import llava_checkpoint
  ckpt = llava_checkpoint(tmp_path)                     # llama3 template, byte-level BPE
  ckpt = llava_checkpoint(tmp_path, template="vicuna_v1")   # SentencePiece-like BPE
  ckpt = shared_llava_checkpoint()   # built once per test process; read it, never write to it
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import transformers as T

import vlm
from tests import hf_models as H
from tests import tiny_tokenizers
from vlm import checkpoint


def llava_checkpoint(tmp_path, *, template: str = "llama3", seed: int = 0,
                     anyres: bool = False, context: int = 128) -> str:
  """Writes tmp_path/ckpt (a 2-layer Llava: 28 px CLIP with 4 image tokens, or anyres over
  28 px tiles; `context` positions) and returns its path."""
  tmp_path = str(tmp_path)
  make_tok = tiny_tokenizers.llama3_tokenizer if template == "llama3" else (
      tiny_tokenizers.llama2_tokenizer)
  tok_dir = make_tok(tmp_path)
  tok = tiny_tokenizers.load(tok_dir)
  image_id = tok.convert_tokens_to_ids(tiny_tokenizers.IMAGE)
  text = H.llama_config(vocab=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, max_position_embeddings=context)
  hf_dir = os.path.join(tmp_path, "hf_llava")
  if anyres:
    cfg = T.LlavaNextConfig(vision_config=H.clip_config(), text_config=text,
                            image_token_index=image_id,
                            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    H.build(T.LlavaNextForConditionalGeneration, cfg, hf_dir, seed)
  else:
    cfg = T.LlavaConfig(vision_config=H.clip_config(), text_config=text,
                        image_token_index=image_id, vision_feature_layer=-2)
    H.build(T.LlavaForConditionalGeneration, cfg, hf_dir, seed)
  model, params = vlm.from_pretrained(hf_dir)
  out = os.path.join(tmp_path, "ckpt")
  checkpoint.save(out, model.config.replace(template=template), params, tok_dir)
  return out


@functools.lru_cache(maxsize=None)
def shared_llava_checkpoint(template: str = "llama3", anyres: bool = False) -> str:
  """llava_checkpoint built once per process (in a temp dir removed at exit), for tests that
  only read it."""
  tmp = tempfile.mkdtemp(prefix="tiny_ckpt_")
  atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  return llava_checkpoint(tmp, template=template, anyres=anyres)
