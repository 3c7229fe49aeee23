"""The optimizer: optax chain of global-norm clipping (Pascanu et al. 2013) and AdamW (Loshchilov &
Hutter 2019, Algorithm 2) with a linear warmup followed by a cosine (SGDR, Loshchilov & Hutter
2017, eq. 5, without restarts), linear or constant schedule. Weight decay skips 1-D parameters
(norm scales, biases), as is usual for transformers."""

from __future__ import annotations

import jax
import optax

from lcinfer.train.config import TrainConfig


def make_schedule(config: TrainConfig) -> optax.Schedule:
  """Learning rate as a function of the update count c (0 for the first update).

  Warmup: lr * c / warmup_steps for c < warmup_steps. Then over the remaining
  D = total_steps - warmup_steps updates, with u = (c - warmup_steps) / D in [0, 1]:
    cosine:   lr * (m + (1 - m) * (1 + cos(pi u)) / 2)      m = min_lr_ratio
    linear:   lr * (1 - (1 - m) u)
    constant: lr
  """
  lr, warm = float(config.learning_rate), config.warmup_steps
  decay_steps = config.total_steps - warm
  end = lr * float(config.min_lr_ratio)
  if config.schedule == "constant" or decay_steps == 0:
    main = optax.constant_schedule(lr)
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(config.min_lr_ratio))
  else:
    main = optax.linear_schedule(lr, end, decay_steps)
  if warm == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def decay_mask(params):
  """True for parameters that get weight decay: those with 2 or more dimensions."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip_norm) (skipped when 0), then AdamW on `make_schedule`."""
  adamw = optax.adamw(make_schedule(config), b1=float(config.b1), b2=float(config.b2),
                      weight_decay=float(config.weight_decay), mask=decay_mask)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(float(config.grad_clip_norm)), adamw)
  return optax.chain(optax.identity(), adamw)  # same state structure with and without clipping
