"""Dense softmax attention in plain XLA (Vaswani et al. 2017, eq. 1): the reference every method
is tested against, and the always-available fallback.

  out = softmax(q k^T * scale + mask) v,   lse = log sum_k exp(q k^T * scale + mask)

Logits and softmax in float32 (bf16 operands accumulate in float32); probabilities are cast to the
value dtype before the second product, as transformers' eager attention does. GQA groups query
heads per kv head with a reshape, so K/V are never repeated in memory. Memory is O(T * S) per
head: fine for tests, decode and short prompts; long prefills on GPU go through cuDNN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcinfer.attention import base
from lcinfer.precision import precision_for


def _softmax_out(logits, mask, v, value_spec: str):
  """Masked softmax over the last axis of `logits`; returns (probs @ v, lse)."""
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)
  s = jnp.sum(e, axis=-1, keepdims=True)
  probs = jnp.where(s > 0, e / jnp.where(s > 0, s, 1.0), 0.0)
  lse = jnp.where(s[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(s[..., 0] > 0, s[..., 0], 1.0)), -jnp.inf)
  out = jnp.einsum(value_spec, probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                   precision=precision_for(v.dtype))
  return out, lse


@dataclasses.dataclass(frozen=True)
class DenseAttention:
  """XLA einsum attention with position masks, sliding window and segment ids."""

  name: str = "dense"

  def supports(self, config, mesh, phase):
    return None

  def prefill(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, scale, window=None,
              q_seg_BT=None, kv_seg_BS=None, need_lse=True):
    del need_lse  # lse comes at no extra cost here
    b, t, h, d = q_BTHD.shape
    kh = k_BSKD.shape[2]
    q = base.split_heads_gqa(q_BTHD, kh)
    logits = jnp.einsum("BTKGD,BSKD->BKGTS", q, k_BSKD, preferred_element_type=jnp.float32,
                        precision=precision_for(k_BSKD.dtype)) * scale
    mask = base.visible(q_pos_BT[:, :, None], kv_pos_BS[:, None, :], window)  # [B, T, S]
    if q_seg_BT is not None:
      mask = mask & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])
    out, lse = _softmax_out(logits, mask[:, None, None], v_BSKD, "BKGTS,BSKD->BTKGD")
    return out.reshape(b, t, h, -1).astype(q_BTHD.dtype), _lse_to_bth(lse)

  def decode(self, q_BTHD, k_BKCD, v_BKCD, *, q_pos_BT, kv_pos_BKC, scale, window=None):
    b, t, h, d = q_BTHD.shape
    kh = k_BKCD.shape[1]
    q = base.split_heads_gqa(q_BTHD, kh)
    logits = jnp.einsum("BTKGD,BKCD->BKGTC", q, k_BKCD, preferred_element_type=jnp.float32,
                        precision=precision_for(k_BKCD.dtype)) * scale
    mask = base.visible(q_pos_BT[:, None, None, :, None], kv_pos_BKC[:, :, None, None, :], window)
    out, lse = _softmax_out(logits, mask, v_BKCD, "BKGTC,BKCD->BTKGD")
    return out.reshape(b, t, h, -1).astype(q_BTHD.dtype), _lse_to_bth(lse)


def _lse_to_bth(lse_BKGT: jax.Array) -> jax.Array:
  b, k, g, t = lse_BKGT.shape
  return jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(b, t, k * g)


DENSE = base.register(DenseAttention(), auto_priority=100)
