"""The loss and the jitted train / eval steps.

Loss: the sum of token losses over trained tokens divided by the number of trained tokens in the
whole global batch (LLaVA's per-batch mean, made independent of how the batch is cut into
micro-batches). Gradient accumulation is a `lax.scan` over micro-batches inside one jitted step, so
accumulating 4x1 equals one micro-batch of 4 up to float summation order.

Only the trainable tree is differentiated, updated and donated; frozen weights are a separate,
read-only argument (no gradient, no optimizer state, storable in bf16). A step whose gradients or
loss are not finite leaves parameters and optimizer state unchanged and bumps two counters
(`nonfinite`: in a row, `skipped_steps`: in total); the host aborts after M in a row.

Both steps trace the model inside `activation_sharding(mesh, rules)`: the run's sharding rules
(config.sharding_rules) pin the activations of every block, as they place the weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from data.conversation import IGNORE
from train.plan import RNG_WORDS
from train.trainable import combine
from vlm.model import VLM
from vlm.sharding import BATCH, DEFAULT_RULES, activation_sharding

MODEL_INPUTS = ("input_ids", "pixel_values", "image_sizes", "positions", "segment_ids")


def token_losses(model: VLM, params, batch: dict, rng, *, chunk: int = 0, train: bool = True):
  """(sum of cross-entropies over trained tokens, number of trained tokens) for one batch.

  labels are aligned with input_ids; position t predicts labels[t + 1]. chunk > 0 projects the
  final hidden states to the vocabulary `chunk` positions at a time under remat, so float32
  logits for the whole sequence never exist at once (Llama-3's 128k vocabulary)."""
  kw = {k: batch[k] for k in MODEL_INPUTS[2:] if k in batch}
  h = model.apply({"params": params}, batch["input_ids"], batch.get("pixel_values"),
                  deterministic=not train, return_hidden=True, rngs={"dropout": rng}, **kw)
  labels = batch["labels"]
  targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
  mask = targets != IGNORE
  safe = jnp.where(mask, targets, 0)

  def ce(h_c, t_c, m_c):
    logits = model.apply({"params": params}, h_c, method=VLM.logits)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t_c) * m_c)

  b, t = targets.shape
  if not chunk or chunk >= t:
    total = ce(h, safe, mask)
  else:
    pad = -t % chunk
    if pad:
      h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
      safe, mask = jnp.pad(safe, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
    body = jax.checkpoint(lambda acc, xs: (acc + ce(*xs), None))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(h), split(safe), split(mask)))
  return total, jnp.sum(mask).astype(jnp.int32)


def _microbatches(batch: dict, n: int, mesh) -> dict:
  """[G, ...] -> [n, G / n, ...] with micro-batch a = rows a, a + n, a + 2n, ...: each device
  already holds its share of every micro-batch (the batch axis is split in contiguous blocks)."""
  def cut(x):
    g = x.shape[0]
    if g % n:
      raise ValueError(f"global batch {g} is not divisible by grad_accum {n}")
    y = jnp.swapaxes(x.reshape(g // n, n, *x.shape[1:]), 0, 1)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if (g // n) % batch_devices == 0:
      spec = P(None, BATCH, *([None] * (x.ndim - 1)))
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    return y
  return {k: cut(v) for k, v in batch.items()}


def make_train_step(model: VLM, tx, *, mesh, state_shardings, frozen_shardings, batch_shardings,
                    grad_accum: int = 1, loss_chunk: int = 0, rules=DEFAULT_RULES):
  """jit(step)(state, frozen, batch) -> (state, metrics); the state's buffers are donated.

  state: {"step", "rng", "trainable", "opt", "nonfinite", "skipped_steps"}."""

  def loss_fn(trainable, frozen, mb, rng, n_total):
    total, n = token_losses(model, combine(frozen, trainable), mb, rng, chunk=loss_chunk)
    return total / n_total, n

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, frozen, batch):
    with activation_sharding(mesh, rules):
      return _step(state, frozen, batch)

  def _step(state, frozen, batch):
    impl = {n: name for name, n in RNG_WORDS.items()}[state["rng"].shape[-1]]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=impl), state["step"])
    labels = batch["labels"]
    n_total = jnp.maximum(jnp.sum(labels[:, 1:] != IGNORE), 1).astype(jnp.float32)
    trainable = state["trainable"]
    if grad_accum == 1:
      (loss, n), grads = grad_fn(trainable, frozen, batch, rng, n_total)
    else:
      def body(carry, xs):
        g_acc, l_acc, n_acc = carry
        i, mb = xs
        (l, n), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i), n_total)
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None
      zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
      (grads, loss, n), _ = jax.lax.scan(
          body, init, (jnp.arange(grad_accum), _microbatches(batch, grad_accum, mesh)))
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, new_opt = tx.update(grads, state["opt"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = dict(state, step=state["step"] + 1, trainable=keep(new_trainable, trainable),
                     opt=keep(new_opt, state["opt"]),
                     nonfinite=jnp.where(ok, 0, state["nonfinite"] + 1),
                     skipped_steps=state["skipped_steps"] + (~ok).astype(jnp.int32))
    real = (jnp.sum(batch["segment_ids"] > 0) if "segment_ids" in batch
            else jnp.int32(labels.size))
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": n, "real_tokens": real, "finite": ok,
               "nonfinite": new_state["nonfinite"], "skipped_steps": new_state["skipped_steps"]}
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model: VLM, *, mesh, trainable_shardings, frozen_shardings, batch_shardings,
                   loss_chunk: int = 0, rules=DEFAULT_RULES):
  """jit(eval)(trainable, frozen, batch) -> (loss sum, trained tokens) for a held-out batch."""
  def run(trainable, frozen, batch):
    with activation_sharding(mesh, rules):
      return token_losses(model, combine(frozen, trainable), batch, jax.random.key(0),
                          chunk=loss_chunk, train=False)
  replicated = NamedSharding(mesh, P())
  return jax.jit(run, in_shardings=(trainable_shardings, frozen_shardings, batch_shardings),
                 out_shardings=(replicated, replicated))
