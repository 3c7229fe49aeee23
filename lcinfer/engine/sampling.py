"""Token sampling: greedy, temperature, top-k (Fan et al. 2018), top-p / nucleus (Holtzman et al. 2020).

Applied in transformers' order: temperature, then top-k, then top-p, then a categorical draw.
`Sampling` is a frozen (hashable) dataclass and a static jit argument: greedy compiles to an argmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcinfer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  greedy: bool = False

  def __post_init__(self):
    if not self.greedy and not self.temperature > 0:
      raise ConfigError(f"sampling.temperature must be > 0 (use greedy for argmax), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ConfigError(f"sampling.top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")

  @staticmethod
  def parse(s: "Sampling | str | dict | None") -> "Sampling":
    """'greedy' | 'temperature=0.7,top_k=50,top_p=0.9' | dict | Sampling | None (greedy)."""
    if s is None or s == "greedy":
      return GREEDY
    if isinstance(s, Sampling):
      return s
    if isinstance(s, dict):
      return Sampling(**s)
    kw = {}
    for part in filter(None, (p.strip() for p in str(s).split(","))):
      if "=" not in part:
        raise ConfigError(f"sampling: expected key=value, got {part!r} (keys: temperature, top_k, top_p)")
      k, v = (x.strip() for x in part.split("=", 1))
      if k == "top_k":
        kw[k] = int(v)
      elif k in ("temperature", "top_p"):
        kw[k] = float(v)
      else:
        raise ConfigError(f"sampling: unknown key {k!r} (keys: temperature, top_k, top_p)")
    return Sampling(**kw)


GREEDY = Sampling(greedy=True)


def filter_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
  """Temperature-scaled logits with everything outside top-k / top-p set to -inf."""
  x = logits_BV.astype(jnp.float32) / s.temperature
  if s.top_k is not None and s.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if s.top_p is not None and s.top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    drop_sorted = before >= s.top_p  # the top token is always kept (before = 0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(drop_sorted)
    x = jnp.where(drop, -jnp.inf, x)
  return x


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """One token id per row, int32 [B]."""
  if s.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BV, s), axis=-1).astype(jnp.int32)
