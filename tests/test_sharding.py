"""A VLM forward+backward on a (2,2,2) mesh of 8 simulated devices equals the single-device run."""
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from vlm import sharding
from vlm.config import LlamaConfig, LoraConfig, TilerConfig, VisionConfig, VLMConfig
from vlm.model import VLM, init_params

CFG = VLMConfig(
    llm=LlamaConfig(vocab_size=128, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64),
    vision=VisionConfig(image_size=28, patch_size=14, width=16, layers=2, heads=2, mlp_dim=32),
    tiler=TilerConfig(kind="s2", scales=(28, 56)), image_token_id=127,
    lora=LoraConfig(rank=4, alpha=8))


def _batch(rng, b=4, t=12):
  ids = rng.integers(0, 127, size=(b, t)).astype(np.int32)
  ids[:, 2:6] = 127
  px = rng.integers(0, 256, size=(b, 1, 56, 56, 3), dtype=np.uint8)
  return {"input_ids": ids, "pixel_values": px}


def _loss(model, params, batch):
  logits = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"])
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1))


def test_sharded_equals_single_device():
  model = VLM(CFG)
  params = init_params(CFG, jax.random.key(0))
  batch = _batch(np.random.default_rng(0))
  fn = jax.value_and_grad(lambda p, b: _loss(model, p, b))
  single = jax.jit(fn)(
      jax.device_put(params, jax.devices()[0]), jax.device_put(batch, jax.devices()[0]))

  mesh = sharding.make_mesh((2, 2, 2))
  p_shard = sharding.param_shardings(CFG, mesh)
  b_shard = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  sp = sharding.shard(params, p_shard)
  sb = sharding.shard(batch, b_shard)
  step = jax.jit(fn, in_shardings=(p_shard, b_shard), out_shardings=(sharding.replicated(mesh), p_shard))
  loss, grads = step(sp, sb)
  assert abs(float(loss) - float(single[0])) <= 1e-5
  for (k, g1), g2 in zip(flatten_dict(single[1]).items(), flatten_dict(grads).values()):
    assert np.abs(np.asarray(g1) - np.asarray(g2)).max() <= 1e-5, k
  # Large weights are really split: the LLM MLP kernel [L, 32, 64] is fsdp x tensor sharded.
  gate = sp["llm"]["layers"]["layer"]["mlp"]["gate"]["kernel"]
  assert gate.addressable_shards[0].data.shape == (2, 16, 32)
  emb = sp["llm"]["embed"]
  assert emb.addressable_shards[0].data.shape == (64, 16)  # vocab on tensor, embed on fsdp
  fc1 = sp["vision"]["layers"]["block"]["fc1"]["kernel"]
  assert fc1.addressable_shards[0].data.shape == (2, 8, 16)
  assert grads["llm"]["layers"]["layer"]["mlp"]["gate"]["kernel"].sharding == p_shard["llm"]["layers"]["layer"]["mlp"]["gate"]["kernel"]


def test_spec_skips_indivisible_axes():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.spec_for(("vocab", "embed"), (129, 32), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.spec_for(("batch", None), (8, 3), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert sharding.spec_for(("batch", None), (2, 3), mesh) == jax.sharding.PartitionSpec("data", None)


def test_constrain_follows_the_rules_in_effect_and_is_identity_outside():
  mesh = sharding.make_mesh((2, 2, 2))
  residual = ("activation_batch", "activation_length", "activation_embed")
  f = jax.jit(lambda x: sharding.constrain(x, residual) * 2)
  x = jnp.ones((4, 8, 6))
  assert sharding.constrain(x, residual) is x   # no rules in effect: a plain model.apply
  with sharding.activation_sharding(mesh):
    y = f(x)
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
  assert y.sharding.is_equivalent_to(spec(("data", "fsdp"), None, None), 3)
  # the sequence is a rule like any other: map it to a mesh axis to shard it
  rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "activation_length") + (
      ("activation_length", "tensor"),)
  with sharding.activation_sharding(mesh, rules):
    y = jax.jit(lambda x: sharding.constrain(x, residual) * 2)(x)
  assert y.sharding.is_equivalent_to(spec(("data", "fsdp"), "tensor", None), 3)
