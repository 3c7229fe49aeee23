"""The online softmax shared by lcinfer's attention kernels (Milakov & Gimelshein 2018;
FlashAttention-2, Dao 2023, Algorithm 1), in base 2: logits arrive pre-scaled by log2(e).

  m' = max(m, max_j s_j),  l' = 2^(m - m') l + sum_j 2^(s_j - m'),  acc' = 2^(m - m') acc + 2^(s - m') v
  out = acc / l,  lse = m ln 2 + ln l   (natural log; -inf and out 0 for a row that saw nothing)
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def init(rows: int, d):
  """(acc [rows, d], m [rows], l [rows]) in float32 before any key. d may be a tuple of widths:
  then acc is a tuple of [rows, w] accumulators (values kept in channel pieces, e.g. unpacked from
  quantized codes), and `update` takes v as a matching tuple, or as a function p -> the tuple of
  [rows, w] float32 products p @ V (so that V's scales can be applied outside the product)."""
  acc = (tuple(jnp.zeros((rows, w), jnp.float32) for w in d) if isinstance(d, tuple)
         else jnp.zeros((rows, d), jnp.float32))
  return acc, jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32)


def logits(q, k, qk_scale, precision):
  """q [R, D] x k [N, D] -> [R, N] float32, scaled (qk_scale already includes log2(e))."""
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32) * qk_scale


def update(carry, s, v, mask, precision):
  """Fold one block of base-2 logits s [R, N] (masked where mask is False) and values v [N, D]."""
  acc, m_prev, l_prev = carry
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows with nothing seen yet: no NaN
  alpha = jnp.exp2(m_prev - m_safe)
  p = jnp.exp2(s - m_safe[:, None])
  l_next = alpha * l_prev + jnp.sum(p, axis=1)

  def pv(a, vv):
    return a * alpha[:, None] + lax.dot_general(p.astype(vv.dtype), vv, (((1,), (0,)), ((), ())),
                                                precision=precision, preferred_element_type=jnp.float32)
  if callable(v):  # v(p) -> the [R, w] float32 contributions p @ V of each piece (quantized V)
    acc = tuple(a * alpha[:, None] + c for a, c in zip(acc, v(p)))
  else:
    acc = tuple(pv(a, vv) for a, vv in zip(acc, v)) if isinstance(acc, tuple) else pv(acc, v)
  return acc, m_next, l_next


def update_rows(carry, s, v):
  """Fold one key a row, for each of several keys sharing one rescale: s a sequence of base-2 logits
  [..., R] (-inf where a row takes no key), v the matching value rows [..., R, D] float32 (the
  diagonal kernels: row i's key is i - o, so P V is an elementwise product, not a matmul)."""
  acc, m_prev, l_prev = carry
  m_next = functools.reduce(jnp.maximum, s, m_prev)
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  alpha = jnp.exp2(m_prev - m_safe)
  p = [jnp.exp2(x - m_safe) for x in s]
  acc = acc * alpha[..., None] + sum(pi[..., None] * vi for pi, vi in zip(p, v))
  return acc, m_next, alpha * l_prev + sum(p)


def finish(carry):
  """(out [..., R, D] float32 (a tuple of pieces if acc is one), lse [..., R] natural log)."""
  acc, m, l = carry
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out = tuple(a / l_safe[..., None] for a in acc) if isinstance(acc, tuple) else acc / l_safe[..., None]
  return out, jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)


def descending(lo, hi, body, carry):
  """lax.fori_loop over i = hi - 1, ..., lo (KV blocks nearest the diagonal first)."""
  return lax.fori_loop(lo, hi, lambda i, c: body(lo + hi - 1 - i, c), carry)
