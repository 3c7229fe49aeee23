"""The attention-method protocol, the registry, position-based masks, and the (out, lse) merge.

Every method returns `(out_BTHD, lse_BTH)`: the output in the query dtype and the natural-log
sum-exp of the scaled logits per query and head in float32 (-inf for a query that sees no key).
Partial attentions over disjoint key sets are combined exactly by `merge_attention`.

Layouts: queries `[B, T, H, D]`; fresh keys/values `[B, S, K, D]`; cached keys/values
`[B, K, C, D]` with positions `[B, K, C]` (-1 = empty). H = K * G (GQA); K/V are never repeated
in memory. Masks come from positions, never from slot order:
  visible(q, k) = pos_k >= 0 and pos_q >= 0 and pos_k <= pos_q and (window is None or pos_q - pos_k < window)
                  and (segments are None or seg_q == seg_k)
"""

from __future__ import annotations

import functools
import os
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from lcinfer.errors import ConfigError

PHASES = ("prefill", "decode")


@runtime_checkable
class AttentionMethod(Protocol):
  """One attention implementation. Instances are hashable and used as static jit arguments."""

  name: str

  def supports(self, config, mesh, phase: str) -> str | None:
    """None if this method can run `phase` for `config` on `mesh`, else the reason it cannot."""

  def prefill(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, scale: float,
              window: int | None = None, q_seg_BT=None, kv_seg_BS=None, need_lse: bool = True):
    """Attention of fresh queries over fresh keys (same call). Returns (out_BTHD, lse_BTH).
    need_lse=False: the caller drops lse (a model layer), so a method may skip computing it and
    return None in its place (cuDNN's softmax statistics cost 3-8% of a long prefill)."""

  def decode(self, q_BTHD, k_BKCD, v_BKCD, *, q_pos_BT, kv_pos_BKC, scale: float,
             window: int | None = None):
    """Attention of a few queries over a cache (already holding their own keys)."""


_REGISTRY: dict[str, AttentionMethod] = {}
_AUTO_PRIORITY: dict[str, int] = {}


def register(method: AttentionMethod, *, auto_priority: int | None = None) -> AttentionMethod:
  """Add a method under `method.name`; with `auto_priority`, "auto" tries it (lowest first)."""
  if method.name in _REGISTRY:
    raise ValueError(f"attention method {method.name!r} is already registered")
  _REGISTRY[method.name] = method
  if auto_priority is not None:
    _AUTO_PRIORITY[method.name] = auto_priority
  return method


def available() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> AttentionMethod:
  if name not in _REGISTRY:
    raise ConfigError(f"unknown attention method {name!r}; available: {', '.join(['auto', *available()])}")
  return _REGISTRY[name]


def resolve(name: str, config, mesh=None, phase: str = "prefill") -> AttentionMethod:
  """A concrete method for `phase`. "auto" picks the first registered method that supports it."""
  if phase not in PHASES:
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
  if name != "auto":
    m = get(name)
    reason = m.supports(config, mesh, phase)
    if reason is not None:
      raise ConfigError(f"attention method {name!r} cannot run {phase}: {reason}")
    return m
  reasons = []
  for n in sorted(_AUTO_PRIORITY, key=_AUTO_PRIORITY.get):
    m = _REGISTRY[n]
    reason = m.supports(config, mesh, phase)
    if reason is None:
      return m
    reasons.append(f"{n}: {reason}")
  raise ConfigError(f"no attention method supports {phase}: " + "; ".join(reasons))


# Run the Pallas methods' kernels in interpret mode everywhere (CPU CI): LCINFER_PALLAS_INTERPRET=1.
# Read when a method with `interpret=None` is called or asked `supports`; set it before the first
# jit trace, since jitted callers cache on the (unchanged) method instance.
PALLAS_INTERPRET = os.environ.get("LCINFER_PALLAS_INTERPRET", "") not in ("", "0", "false", "False")


def pallas_interpret(override: bool | None) -> bool:
  """A method's interpret mode: its own setting, else the module-level PALLAS_INTERPRET switch."""
  return PALLAS_INTERPRET if override is None else override


@functools.cache
def _sees(platform: str) -> bool:
  try:
    return any(d.platform == platform for d in jax.devices())
  except RuntimeError:
    return False


def gpu_available() -> bool:
  """Whether JAX sees a CUDA GPU (methods that need one say so in `supports`)."""
  return _sees("gpu")


def tpu_available() -> bool:
  """Whether JAX sees a TPU."""
  return _sees("tpu")


# -- masks ---------------------------------------------------------------------------------------
def visible(q_pos, kv_pos, window: int | None):
  """Boolean visibility from broadcastable query and key positions (see module docstring)."""
  ok = (kv_pos >= 0) & (q_pos >= 0) & (kv_pos <= q_pos)
  if window is not None:
    ok = ok & (q_pos - kv_pos < window)
  return ok


# -- merging partial attentions ------------------------------------------------------------------
def merge_attention(parts):
  """Exact combination of attentions over disjoint key sets: [(out_BTHD, lse_BTH), ...] -> (out, lse).

  out = sum_i exp(lse_i - lse) * out_i, lse = log sum_i exp(lse_i). Parts with lse = -inf (no
  visible key) contribute nothing; if every part is empty the output is 0 and lse is -inf.
  """
  if not parts:
    raise ValueError("merge_attention needs at least one (out, lse) pair")
  if len(parts) == 1:
    return parts[0]
  lses = jnp.stack([p[1].astype(jnp.float32) for p in parts])
  lse_max = jnp.max(lses, axis=0)
  safe_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
  w = jnp.exp(lses - safe_max)  # exp(-inf) = 0
  denom = jnp.sum(w, axis=0)
  out = sum(w[i][..., None] * p[0].astype(jnp.float32) for i, p in enumerate(parts))
  out = jnp.where(denom[..., None] > 0, out / jnp.maximum(denom, 1e-30)[..., None], 0.0)
  lse = jnp.where(denom > 0, safe_max + jnp.log(jnp.maximum(denom, 1e-30)), -jnp.inf)
  return out.astype(parts[0][0].dtype), lse


def split_heads_gqa(q_BTHD: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, H, D] -> [B, T, K, G, D]: query head h uses kv head h // G, as HF's repeat_kv does."""
  b, t, h, d = q_BTHD.shape
  if h % num_kv_heads:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({num_kv_heads})")
  return q_BTHD.reshape(b, t, num_kv_heads, h // num_kv_heads, d)
