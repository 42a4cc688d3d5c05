"""The jitted train step (train/step.py, train/plan.py, train/state.py): sharded = single device,
gradient accumulation 4x1 = one micro-batch of 4, the loss normalized over the whole global batch,
frozen weights untouched (bf16 storage), a LoRA stage moving only adapters + connector, non-finite
steps skipped and counted, and the collectives of the compiled step on fsdp and fsdp x tensor
meshes."""
import math
import re

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from configs import common
from data.errors import UserError
from train import plan as plan_lib
from train import state as state_lib
from train.step import make_train_step, token_losses
from train.trainable import combine
from vlm.sharding import batch_shardings
from vlm import checkpoint
from vlm.config import VLMConfig
from vlm.model import abstract_params
from vlm.sharding import DEFAULT_RULES, make_mesh, param_shardings

VOCAB, IMG = 64, 63
LLM = dict(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
           max_positions=64)
VISION = dict(image_size=28, patch_size=14, width=16, layers=1, heads=2, mlp_dim=32,
              select_layer=-1)
TEXT = VLMConfig.from_dict(dict(llm=LLM, template="llama3"))
VLM_CFG = VLMConfig.from_dict(dict(llm=LLM, vision=VISION, tiler=dict(kind="single"),
                                   image_token_id=IMG, template="llama3"))


def write_model(path, cfg: VLMConfig, seed=0) -> str:
  """A random checkpoint of this project (numpy: no init program to compile)."""
  rng = np.random.default_rng(seed)

  def value(path, shape):
    if path[-1] in ("scale",):
      return np.ones(shape, np.float32)
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)
  flat = flatten_dict(abstract_params(cfg, boxed=False))
  checkpoint.save(str(path), cfg, unflatten_dict({k: value(k, v.shape) for k, v in flat.items()}))
  return str(path)


def config(init, **kw):
  c = common.base()
  c.model.update(init=init, dtype="float32", frozen_dtype="", remat="none", attention="xla")
  c.trainable = (r"^connector/", r"^llm/")
  c.optim.update(lr=1e-4, warmup_ratio=0.0, grad_accum=1)
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def batches(n, b=4, t=16, seed=0, images=False):
  """Random rows: trained answer spans of varying length, padding (segment 0) at the end; with
  images: 4 placeholders and one uint8 image per row."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(0, IMG, (b, t)).astype(np.int32)
    labels = np.full((b, t), -100, np.int32)
    seg = np.ones((b, t), np.int32)
    for r in range(b):
      end = t - int(rng.integers(0, 5))
      start = int(rng.integers(6, end - 2))
      labels[r, start:end] = ids[r, start:end]
      seg[r, end:] = 0
    row = {"input_ids": ids, "labels": labels, "segment_ids": seg,
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
    if images:
      ids[:, 1:5] = IMG
      row["pixel_values"] = rng.integers(0, 256, (b, 1, 28, 28, 3), dtype=np.uint8)
    out.append(row)
  return out


def one_device():
  return make_mesh((1, 1, 1), jax.devices()[:1])


def step_fn(c, mesh, batch, total_steps, compile_options=None):
  """(state, frozen, batch shardings, step) of config c on mesh; with compile_options the step is
  compiled ahead of time for `batch`'s shapes (then `step.as_text()` is its HLO)."""
  plan = plan_lib.plan(c, mesh, total_steps=total_steps)
  st, frozen = state_lib.load(c, plan)
  sh = batch_shardings(mesh, batch)
  fn = make_train_step(plan.model, plan.tx, mesh=mesh, state_shardings=plan.state_shardings,
                       frozen_shardings=plan.frozen_shardings, batch_shardings=sh,
                       grad_accum=c.optim.grad_accum, rules=plan.rules)
  if compile_options is not None:
    fn = fn.lower(st, frozen, jax.device_put(batch, sh)).compile(compile_options)
  return st, frozen, sh, fn


def train(c, data, mesh, compile_options=None):
  """(params before, params after, per-step metrics, final state) of len(data) steps."""
  st, frozen, sh, fn = step_fn(c, mesh, data[0], len(data), compile_options)
  first = jax.tree_util.tree_map(np.asarray, combine(frozen, st["trainable"]))
  metrics = []
  for b in data:
    st, m = fn(st, frozen, jax.device_put(b, sh))
    metrics.append(jax.device_get(m))
  last = jax.tree_util.tree_map(np.asarray, combine(frozen, st["trainable"]))
  return first, last, metrics, st


def max_diff(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert fa.keys() == fb.keys()
  return max(float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
  return write_model(tmp_path_factory.mktemp("text") / "ckpt", TEXT)


@pytest.fixture(scope="module")
def single(text_model):
  c = config(text_model, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
  return train(c, batches(3), one_device())


def test_sharded_equals_single_device(text_model, single):
  first, last, metrics, _ = single
  s_first, s_last, s_metrics, st = train(config(text_model, **{"mesh.shape": (2, 2, 2)}),
                                         batches(3), make_mesh((2, 2, 2)))
  assert max_diff(first, s_first) == 0.0
  assert max_diff(first, last) > 2e-4      # training moved the weights (3 Adam steps of 1e-4)
  assert max_diff(last, s_last) <= 1e-5
  np.testing.assert_allclose([m["loss"] for m in s_metrics], [m["loss"] for m in metrics],
                             rtol=1e-5)
  # the optimizer state lives sharded like its parameter
  kernel = st["trainable"]["llm"]["layers"]["layer"]["mlp"]["up"]["kernel"]
  mu = optax.tree_utils.tree_get(st["opt"], "mu")["llm"]["layers"]["layer"]["mlp"]["up"]["kernel"]
  assert mu.sharding == kernel.sharding and len(kernel.sharding.device_set) == 8
  assert not kernel.sharding.is_fully_replicated


def test_accumulation_4x1_equals_one_microbatch_of_4(text_model, single):
  _, last, metrics, _ = single
  c = config(text_model, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1,
                            "optim.grad_accum": 4})
  _, acc_last, acc_metrics, _ = train(c, batches(3), one_device())
  assert max_diff(last, acc_last) <= 1e-5
  np.testing.assert_allclose([m["loss"] for m in acc_metrics], [m["loss"] for m in metrics],
                             rtol=1e-5)
  # the count behind the normalization is the whole global batch's trained tokens
  assert int(metrics[0]["tokens"]) == int((batches(1)[0]["labels"][:, 1:] != -100).sum())


def test_loss_is_sum_over_trained_tokens_over_their_count(text_model):
  c = config(text_model)
  plan = plan_lib.plan(c, one_device(), 1)
  _, params = checkpoint.load(text_model)
  b = batches(1, b=2)[0]
  total, n = jax.jit(lambda p: token_losses(plan.model, p, b, jax.random.key(0), train=False))(
      params)
  logits = plan.model.apply({"params": params}, b["input_ids"], positions=b["positions"],
                            segment_ids=b["segment_ids"])
  logp = np.asarray(jax.nn.log_softmax(logits[:, :-1]))
  tgt = b["labels"][:, 1:]
  mask = tgt != -100
  picked = np.take_along_axis(logp, np.maximum(tgt, 0)[..., None], -1)[..., 0]
  assert int(n) == int(mask.sum()) > 0
  np.testing.assert_allclose(float(total), -np.sum(np.where(mask, picked, 0.0)), rtol=1e-5)
  # the vocabulary-chunked loss (a chunk that does not divide T) agrees
  chunked, n2 = jax.jit(lambda p: token_losses(plan.model, p, b, jax.random.key(0), chunk=5,
                                               train=False))(params)
  assert int(n2) == int(n)
  np.testing.assert_allclose(float(chunked), float(total), rtol=1e-5)


def test_lora_stage_moves_only_adapters_and_connector_and_skips_nonfinite(tmp_path):
  """3 LoRA steps (adapters on the decoder and the tower) with frozen weights stored in bf16;
  batch 2 carries a NaN pixel (float pixels are taken as normalized): that step is skipped."""
  c = config(write_model(tmp_path / "vlm", VLM_CFG),
             **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1, "model.frozen_dtype": "bfloat16"})
  common.lora(c, rank=4, alpha=8.0, dropout=0.0, vision=True)
  data = batches(3, images=True)
  for b in data:
    b["pixel_values"] = b["pixel_values"].astype(np.float32) / 255.0
  data[1]["pixel_values"][0, 0, 3, 3, 0] = np.nan
  mesh = one_device()
  plan = plan_lib.plan(c, mesh, total_steps=3)
  st, frozen = state_lib.load(c, plan)
  sh = batch_shardings(mesh, data[0])
  fn = make_train_step(plan.model, plan.tx, mesh=mesh, state_shardings=plan.state_shardings,
                       frozen_shardings=plan.frozen_shardings, batch_shardings=sh)
  host = lambda s: jax.tree_util.tree_map(np.asarray, (s["trainable"], s["opt"]))
  first_params = jax.tree_util.tree_map(np.asarray, combine(frozen, st["trainable"]))
  frozen_before = jax.tree_util.tree_map(np.asarray, frozen)
  seen = []
  for b in data:
    before = host(st)
    st, m = fn(st, frozen, jax.device_put(b, sh))
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(before),
                                                    jax.tree_util.tree_leaves(host(st))))
    seen.append((bool(m["finite"]), same, int(m["nonfinite"]), int(m["skipped_steps"])))
  assert seen == [(True, False, 0, 0),
                  (False, True, 1, 1),    # skipped: parameters and optimizer state unchanged
                  (True, False, 0, 1)]    # training goes on; the in-a-row counter resets
  assert int(st["step"]) == 3

  last = jax.tree_util.tree_map(np.asarray, combine(frozen, st["trainable"]))
  fa, fb = flatten_dict(first_params), flatten_dict(last)
  changed = {"/".join(k) for k in fa if not np.array_equal(fa[k], fb[k])}
  allowed = {"/".join(k) for k in fa if k[-1] in ("lora_a", "lora_b") or k[0] == "connector"}
  assert changed == allowed   # every adapter (tower ones too) and the connector, nothing else
  assert any(p.startswith("vision/") for p in changed)
  ff = flatten_dict(jax.tree_util.tree_map(np.asarray, frozen))
  assert all(np.array_equal(v, flatten_dict(frozen_before)[k]) for k, v in ff.items())
  assert ff and all(v.dtype == jax.numpy.bfloat16 for v in ff.values())
  assert all(v.dtype == np.float32 for v in flatten_dict(st["trainable"]).values())


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_dropout_key_impl(text_model):
  """train.prng_impl='rbg' stores a 4-word key the step recognizes: LoRA dropout then draws
  other masks than threefry's (so the second step's loss differs: at step 1 the adapters' B is
  no longer zero)."""
  def losses(impl):
    c = config(text_model, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1,
                              "train.prng_impl": impl})
    common.lora(c, rank=4, alpha=8.0, dropout=0.5)
    _, _, metrics, st = train(c, batches(2), one_device())
    assert st["rng"].shape == (plan_lib.RNG_WORDS[impl],)
    return [float(m["loss"]) for m in metrics]
  rbg, threefry = losses("rbg"), losses("threefry2x32")
  assert rbg[0] == threefry[0] and rbg[1] != threefry[1] and np.isfinite(rbg).all()
  with pytest.raises(ValueError, match="prng_impl"):
    plan_lib.plan(config(text_model, **{"train.prng_impl": "philox"}), one_device(), 1)


def test_sharding_rules_come_from_the_config(text_model):
  """config.sharding_rules place the weights (and reach the steps as plan.rules); a rule naming
  no mesh axis is a user error."""
  rules = tuple(r for r in DEFAULT_RULES if r[0] != "mlp") + (("mlp", None),)
  p = plan_lib.plan(config(text_model, sharding_rules=rules), make_mesh((1, 4, 2)), 1)
  assert p.rules == rules
  up = p.param_shardings["llm"]["layers"]["layer"]["mlp"]["up"]["kernel"]
  assert up.spec == jax.sharding.PartitionSpec(None, "fsdp", None)   # [layers, embed, mlp]
  with pytest.raises(UserError, match="sharding_rules"):
    plan_lib.plan(config(text_model, sharding_rules=(("mlp", "model"),)), make_mesh((1, 4, 2)), 1)


# --- activation sharding: the collectives of the compiled step ----------------------------------
# Batches of ROWS x T = 8 x 24: no weight of the tiny models has a second dimension of 24 (or of 5,
# the tower's tokens) nor is an array of rank >= 3 leading with 8, so a collective moving an array
# [rows, 24 | 5, ...] or [8, ., ., ...] moves activations.
ROWS, T, TOWER_TOKENS = 8, 24, 5
# LLVM at -O0: the HLO passes (sharding propagation, SPMD partitioning) are unchanged; compiles
# take half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")


def group_size(line: str) -> int:
  """Devices per replica group of one collective, in each of XLA's printed forms."""
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):      # {{0,1},{2,3}}
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[\d+,(\d+)\]", line):       # [groups,size]<=[8]
    return int(m.group(1))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line):   # mesh axes
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  if "replica_groups={}" in line:
    return jax.device_count()
  raise AssertionError(f"replica groups not understood: {line[:300]}")


def collectives(hlo: str) -> list:
  """(op, devices per group, [(dtype, shape), ...]) of every collective in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    if m := COLLECTIVE.search(line):
      arrays = [(d, tuple(int(x) for x in dims.split(",") if x))
                for d, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
      out.append((m.group(2), None if m.group(2) == "collective-permute" else group_size(line),
                  arrays))
  return out


def activations(arrays) -> list:
  """The float [rows, length, ...] and [all rows, ...] arrays among a collective's operands."""
  return [s for d, s in arrays if d[0] in "fb" and len(s) >= 2
          and (s[1] in (T, TOWER_TOKENS) or (len(s) >= 3 and s[0] == ROWS))]


def reduced_gradient_elements(cfg: VLMConfig, tensor: int) -> int:
  """Elements of the weight gradients the fsdp reduction sums: one layer of the scanned stack
  plus the final norm and LM head, the tensor-local part; not the embedding (its backward
  all-to-all hands each device its own columns)."""
  mesh = make_mesh((1, 1, tensor), jax.devices()[:tensor])
  sh = flatten_dict(param_shardings(cfg, mesh))
  total = 0
  for k, v in flatten_dict(abstract_params(cfg, boxed=False)).items():
    if k != ("llm", "embed"):
      n = math.prod(sh[k].shard_shape(v.shape))
      total += n // cfg.llm.layers if "layers" in k else n
  return total


def one_step(c, mesh, batch):
  """(compiled HLO text, params after one step, metrics)."""
  st, frozen, sh, fn = step_fn(c, mesh, batch, 1, FAST_COMPILE)
  st, m = fn(st, frozen, jax.device_put(batch, sh))
  return (fn.as_text(), jax.tree_util.tree_map(np.asarray, combine(frozen, st["trainable"])),
          jax.device_get(m))


@pytest.fixture(scope="module")
def full_b8_single(text_model):
  batch = batches(1, b=ROWS, t=T, seed=3)[0]
  c = config(text_model, **{"mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
  return batch, one_step(c, one_device(), batch)


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)], ids=["fsdp", "fsdp_tensor"])
def test_compiled_step_collectives(text_model, full_b8_single, shape):
  """The full fine-tuning step of the 2-layer decoder (batch ROWS = 8) with its activations pinned by
  the rules (batch over data x fsdp, heads / mlp / vocab over tensor) moves only:
  - weights over fsdp: each of a layer's 7 kernels is all-gathered in the forward scan and again
    in the backward scan (the scan keeps the sharded slice, not the gathered one), the LM head
    once; the embedding never (its lookup and backward go through all-to-alls);
  - gradients over fsdp: every weight's once (XLA:CPU has no reduce-scatter creator, so this is an
    all-reduce and a slice; GPU / TPU fuse the pair into a reduce-scatter);
  - activations only over tensor: with tensor, the Megatron pattern on the local rows
    [8 / fsdp, T, 32]: per layer o and down forward, the input gradients of q, k, v, gate and up
    backward, and the LM head's input gradient.
  Unconstrained, XLA split the matmuls on the fsdp-sharded contraction axis instead and gathered
  and all-reduced whole-batch activations over fsdp. The result still equals one device."""
  batch, (_, single_last, single_m) = full_b8_single
  fsdp, tensor = shape[1], shape[2]
  c = config(text_model, **{"mesh.shape": shape})
  hlo, last, m = one_step(c, make_mesh(shape), batch)
  ops = collectives(hlo)

  gathers = [(g, arrays) for op, g, arrays in ops if op == "all-gather" and arrays[0][0][0] in "fb"]
  assert [a for _, a in gathers if activations(a)] == []
  assert [g for g, _ in gathers] == [fsdp] * (2 * 7 + 1)
  reduces = [(g, arrays) for op, g, arrays in ops if op == "all-reduce"]
  assert [(g, a) for g, a in reduces if activations(a) and g != tensor] == []
  grads = sum(math.prod(s) for g, a in reduces if g == fsdp for _, s in a if s)  # no scalars
  assert grads == reduced_gradient_elements(TEXT, tensor)
  if tensor > 1:
    residual = [s for g, a in reduces if g == tensor for s in activations(a)
                if s == (ROWS // fsdp, T, TEXT.llm.hidden)]
    assert len(residual) == 2 + 5 + 1

  assert max_diff(single_last, last) <= 1e-5
  np.testing.assert_allclose(m["loss"], single_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(m["grad_norm"], single_m["grad_norm"], rtol=1e-5)


@pytest.mark.slow
def test_compiled_lora_vlm_step_moves_no_activations_over_fsdp(tmp_path):
  """The LoRA stage (adapters on the decoder and the tower, connector trained, bf16 frozen
  weights): on both meshes no activation of the decoder or the tower (nor the image features
  written into the sequence: a per-row gather) is all-gathered or summed over fsdp; the steps
  equal one device."""
  c = config(write_model(tmp_path / "vlm", VLM_CFG), **{"model.frozen_dtype": "bfloat16"})
  common.lora(c, rank=4, alpha=8.0, dropout=0.0, vision=True)
  batch = batches(1, b=ROWS, t=T, seed=4, images=True)[0]
  c.mesh.update(shape=(1, 1, 1), num_devices=1)
  _, single_last, single_m = one_step(c, one_device(), batch)
  for shape in ((1, 8, 1), (1, 4, 2)):
    c.mesh.update(shape=shape, num_devices=0)
    hlo, last, m = one_step(c, make_mesh(shape), batch)
    moved = [(op, g, activations(a)) for op, g, a in collectives(hlo)
             if op in ("all-gather", "all-reduce") and activations(a) and g != shape[2]]
    assert moved == [], shape
    assert max_diff(single_last, last) <= 1e-5, shape
    np.testing.assert_allclose(m["loss"], single_m["loss"], rtol=1e-5)
