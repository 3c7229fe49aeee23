"""Next-token cross-entropy in float32, as sums so gradient accumulation is exact.

A loss function has the signature `loss_fn(model, batch, rng) -> (loss_sum, sums)`: `model` the
merged NNX module, `batch` one micro-batch (dict of [B, T] arrays, see data.py), `rng` a JAX key
for this micro-batch. `loss_sum` is the (float32) quantity differentiated; `sums` is a dict of
float32 scalars that must include "weight", the normaliser. The trainer sums both over the
micro-batches of a step and divides by the total weight, so the update of B rows x A micro-batches
equals that of one batch of A * B rows, and every reported metric is `sums[name] / sums["weight"]`
("loss" and "accuracy" for `next_token_loss`). Distillation or gate-training losses
(SwiftKV, DuoAttention) follow the same contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcinfer import attention as attn_lib

DENSE = attn_lib.get("dense")


def target_weights(batch: dict, dtype=jnp.float32) -> jax.Array:
  """[B, T-1] weight of target t+1 (predicted at position t): loss_mask, zeroed where the input or
  the target is padding (position -1) or where the target starts a new segment."""
  tokens = batch["tokens"]
  w = batch.get("loss_mask")
  w = jnp.ones(tokens.shape, dtype) if w is None else w.astype(dtype)
  w = w[:, 1:]
  pos = batch.get("positions")
  if pos is not None:
    w = jnp.where((pos[:, :-1] >= 0) & (pos[:, 1:] >= 0), w, 0.0)
  seg = batch.get("segment_ids")
  if seg is not None:
    w = jnp.where(seg[:, :-1] == seg[:, 1:], w, 0.0)
  return w


def positions_of(batch: dict) -> jax.Array:
  pos = batch.get("positions")
  if pos is None:
    b, t = batch["tokens"].shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return pos


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token -log softmax(logits)[target] in float32 and whether argmax == target."""
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets_BT
  return lse - target_logit, correct


def next_token_loss(model, batch: dict, rng=None, *, attention=DENSE):
  """Sum over weighted target positions of the next-token cross-entropy (float32).

  Hidden states from `model(tokens, positions, attention=attention)` (no cache, causal; packed
  segments attend within themselves), logits from `model.logits`. Returns (loss_sum,
  {"loss": loss_sum, "accuracy": sum of weights where argmax == target, "weight": sum of weights}).
  """
  del rng  # deterministic
  tokens = batch["tokens"]
  h, _ = model(tokens, positions_of(batch), attention=attention, segment_ids_BT=batch.get("segment_ids"))
  logits = model.logits(h[:, :-1])
  nll, correct = token_cross_entropy(logits, tokens[:, 1:])
  w = target_weights(batch)
  loss_sum = jnp.sum(nll * w)
  return loss_sum, {"loss": loss_sum, "accuracy": jnp.sum(jnp.where(correct, w, 0.0)), "weight": jnp.sum(w)}


def mean_metrics(sums: dict) -> dict:
  """{name: sums[name] / weight} for every entry but "weight" (0 when no target counted)."""
  w = sums["weight"]
  safe = jnp.maximum(w, 1e-30) if isinstance(w, jax.Array) else max(w, 1e-30)
  return {k: v / safe for k, v in sums.items() if k != "weight"}


def evaluate(graphdef, params, batch: dict, *, loss_fn=next_token_loss, rng=None) -> dict[str, float]:
  """Mean metrics (e.g. loss, accuracy) of `params` on one batch (host arrays), no update."""
  from flax import nnx

  @jax.jit
  def run(params, batch):
    _, sums = loss_fn(nnx.merge(graphdef, params), batch, rng)
    return mean_metrics(sums)

  return {k: float(v) for k, v in run(params, {k: jnp.asarray(v) for k, v in batch.items()}).items()}
