"""LoRA parity with peft on a tiny HF Llama; merge; gradients and optimizer steps reach only
trainable params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
import transformers as T
from flax.traverse_util import flatten_dict

from convert import hf
from vlm import hf as vlm_hf
from tests import hf_models as H
from train.trainable import combine, partition, select
from vlm import lora
from vlm.config import LoraConfig, VLMConfig
from vlm.model import VLM

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _peft_model():
  base = H.build(T.LlamaForCausalLM, H.llama_config(rope=H.LLAMA3_ROPE), seed=7)
  pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
  model = peft.get_peft_model(base, pcfg)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # B starts at zero in peft: give every adapter real weights
    for n, p in model.named_parameters():
      if "lora_" in n:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
  return model.eval()


def _ours(ref):
  cfg = VLMConfig(llm=vlm_hf.text_config(ref.base_model.model.config.to_dict()),
                  lora=LoraConfig(rank=4, alpha=8, targets=("q", "v", "o", "down")))
  tensors = {vlm_hf.canonical_name(k): v.numpy() for k, v in ref.state_dict().items()}
  return VLM(cfg), vlm_hf.import_weights(cfg, tensors, source="peft"), cfg


def test_lora_logits_match_peft_and_merge():
  ref = _peft_model()
  model, params, cfg = _ours(ref)
  ids = H.rand_ids(np.random.default_rng(0), (2, 16), 96)
  with torch.no_grad():
    want = H.to_np(ref(input_ids=torch.tensor(ids)).logits)
  run = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids, jnp.int32)))
  got = np.asarray(run(params))
  assert np.abs(got - want).max() <= 1e-4
  # The adapters matter here (otherwise the check above proves nothing about LoRA).
  with torch.no_grad(), ref.disable_adapter():
    base = H.to_np(ref(input_ids=torch.tensor(ids)).logits)
  assert np.abs(base - want).max() > 1e-2
  # merged == unmerged
  merged = lora.merge(params, cfg.lora.scale)
  assert not any(k[-1].startswith("lora_") for k in flatten_dict(merged))
  plain = VLM(cfg.replace(lora=LoraConfig()))
  got_merged = np.asarray(jax.jit(lambda p: plain.apply({"params": p}, jnp.asarray(ids, jnp.int32)))(merged))
  assert np.abs(got_merged - got).max() <= 1e-5
  # each merged kernel is W + A B * scale, per stacked layer (numpy, float64)
  flat, got_flat = flatten_dict(params), flatten_dict(merged)
  for path in lora.lora_paths(params):
    w, a, b = (np.asarray(flat[path + (n,)], np.float64) for n in ("kernel", "lora_a", "lora_b"))
    np.testing.assert_allclose(np.asarray(got_flat[path + ("kernel",)]), w + a @ b * cfg.lora.scale,
                               atol=1e-5)


def test_lora_gradients_match_peft_and_stay_in_trainable_set():
  ref = _peft_model()
  model, params, _ = _ours(ref)
  ids_np = H.rand_ids(np.random.default_rng(1), (2, 12), 96)
  ids = jnp.asarray(ids_np, jnp.int32)
  # peft: only adapters require grad.
  out = ref(input_ids=torch.tensor(ids_np), labels=torch.tensor(ids_np))
  out.loss.backward()
  want = {vlm_hf.canonical_name(n): p.grad.numpy() for n, p in ref.named_parameters()
          if p.requires_grad}
  assert want and all("lora_" in k[1] for k in want)

  trainable = select(params, [r"lora_"])
  train, frozen = partition(params, trainable)

  def loss(p_train):
    logits = model.apply({"params": combine(p_train, frozen)}, ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  grads = jax.jit(jax.grad(loss))(train)
  flat = flatten_dict(grads)
  assert all(k[-1].startswith("lora_") for k in flat), "gradients must only exist for trainables"
  # Real optimizer steps on the selected tree: every frozen weight stays bit for bit (AdamW's
  # decoupled decay would move one that leaked into the trainable set even without a gradient)
  # and every adapter moves.
  tx = optax.adamw(1e-2, weight_decay=0.1)
  step = jax.jit(lambda p, o: tx.update(jax.grad(loss)(p), o, p))
  p_train, opt = train, tx.init(train)
  for _ in range(2):
    updates, opt = step(p_train, opt)
    p_train = optax.apply_updates(p_train, updates)
  before, after = flatten_dict(params), flatten_dict(combine(p_train, frozen))
  assert set(after) == set(before)
  moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
  assert moved == {k for k in before if k[-1].startswith("lora_")}
  got = dict(hf.iter_export(_ours(ref)[2], grads, lambda comp, nm: (comp, nm)))
  assert set(got) == set(want)
  for k, g in want.items():
    assert np.abs(got[k] - g).max() <= 1e-5, k
