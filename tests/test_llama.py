"""Decoder parity with HF LlamaForCausalLM / MistralForCausalLM (float32, <= 1e-4); the untied
Llama-3 case runs in tests/test_from_pretrained.py, through a fresh interpreter importing only vlm."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import vlm
from tests import hf_models as H


CASES = {
    "llama3_gqa_tied": dict(rope=H.LLAMA3_ROPE, tie=True),
    "mistral": dict(mistral=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, tmp_path):
  kw = dict(CASES[case])
  cls = T.MistralForCausalLM if kw.get("mistral") else T.LlamaForCausalLM
  ref = H.build(cls, H.llama_config(**kw), tmp_path)
  model, params = vlm.from_pretrained(str(tmp_path))
  assert model.config.llm.tie_embeddings == bool(kw.get("tie"))
  rng = np.random.default_rng(0)
  ids = H.rand_ids(rng, (2, 24), 96)
  # Right-padded batch: row 1 has 7 pad tokens; explicit positions starting at 3 (row 0) and 0.
  mask = np.ones((2, 24), np.int64)
  mask[1, 17:] = 0
  pos = np.stack([np.arange(24) + 3, np.arange(24)])
  with torch.no_grad():
    want = H.to_np(ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos)).logits)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                               positions=jnp.asarray(pos, jnp.int32),
                               segment_ids=jnp.asarray(mask, jnp.int32)))
  assert got.dtype == np.float32 and got.shape == want.shape
  valid = mask.astype(bool)
  err = np.abs(got - want)[valid].max()
  assert err <= 1e-4, err
  # Sanity: the reference differs from a model without the llama3 scaling where it applies.
  assert np.abs(want).max() > 0.1


def test_rope_llama3_inv_freq_matches_hf():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from vlm.llama import rope_inv_freq
  from vlm.hf import text_config
  c = H.llama_config(rope=H.LLAMA3_ROPE, head_dim=64, hidden_size=128)
  want, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
  got = rope_inv_freq(text_config(c.to_dict()))
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  plain = rope_inv_freq(text_config(H.llama_config(head_dim=64, hidden_size=128).to_dict()))
  assert not np.allclose(plain, got)
