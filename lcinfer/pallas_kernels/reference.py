"""Pure-jnp float32 oracles for the Pallas kernels. Slow (O(T * S) memory per head), exact, simple.

Masking convention shared with the kernels (index based, for one call over contiguous tokens):
query i sits at absolute position `kv_offset + i`; key j at position j (the keys 0..S-1 may hold an
existing prefix of `kv_offset` tokens: chunked prefill). Query at p sees key k iff
  (not causal or k <= p) and (window is None or p - window < k)
  and (segments are None or q_seg[i] == kv_seg[j])
  and (q_lengths is None or i < q_lengths[b]) and (kv_lengths is None or j < kv_lengths[b]).
A query that sees nothing gets out = 0 and lse = -inf. lse is the natural-log sum-exp of the scaled
logits, float32, shape [B, T, H].
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def check_qkv(q_BTHD, k, v, *, kv_layout: str = "BSKD") -> tuple[int, int, int, int, int, int]:
  """The checks every attention call shares: q [B, T, H, D], k and v alike in `kv_layout`
  ("BSKD": [B, S, K, D]; "BKCD": a cache [B, K, C, D]), same batch and head_dim, H a multiple of K
  (GQA), one float dtype. Returns (B, T, H, D, S or C, K). Raises ValueError."""
  if q_BTHD.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q must be [B, T, H, D] and k, v [{', '.join(kv_layout)}]; got q {q_BTHD.shape}, "
                     f"k {k.shape}, v {v.shape}")
  b, t, h, d = q_BTHD.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  bk, s, kh, dk = k.shape if kv_layout == "BSKD" else (k.shape[0], k.shape[2], k.shape[1], k.shape[3])
  if bk != b:
    raise ValueError(f"batch mismatch: q has B={b}, k/v have B={bk}")
  if dk != d:
    raise ValueError(f"head_dim mismatch: q has D={d}, k/v have D={dk}")
  if kh == 0 or h % kh:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kh}) for GQA")
  if not (q_BTHD.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q_BTHD.dtype}, {k.dtype}, {v.dtype}")
  if q_BTHD.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {q_BTHD.dtype}")
  return b, t, h, d, s, kh


def check_attention_args(q_BTHD, k_BSKD, v_BSKD, *, scale, causal, window, q_segment_ids,
                         kv_segment_ids, kv_offset, q_lengths, kv_lengths):
  """Trace-time validation shared by the oracle and the kernels. Raises ValueError."""
  b, t, h, d, s, kh = check_qkv(q_BTHD, k_BSKD, v_BSKD)
  if window is not None:
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
      raise ValueError(f"window must be a positive int (keys p - window < k <= p) or None, got {window!r}")
    if not causal:
      raise ValueError("window needs causal=True (a sliding window is a band below the diagonal)")
  if not isinstance(kv_offset, int) or kv_offset < 0:
    raise ValueError(f"kv_offset must be a static int >= 0, got {kv_offset!r}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
      raise ValueError(f"segment ids must be q [B, T] = {(b, t)} and kv [B, S] = {(b, s)}; got "
                       f"{q_segment_ids.shape} and {kv_segment_ids.shape}")
  for name, x in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
    if x is not None and jnp.shape(x) != (b,):
      raise ValueError(f"{name} must have shape [B] = {(b,)}, got {jnp.shape(x)}")
  if not isinstance(scale, (int, float)):
    raise ValueError(f"scale must be a static Python float, got {type(scale).__name__}")


def visibility_mask(b, t, s, *, causal=True, window=None, q_segment_ids=None, kv_segment_ids=None,
                    kv_offset=0, q_lengths=None, kv_lengths=None):
  """Boolean [B, T, S] mask of the convention in the module docstring."""
  qp = (kv_offset + jnp.arange(t, dtype=jnp.int32))[None, :, None]
  kp = jnp.arange(s, dtype=jnp.int32)[None, None, :]
  ok = jnp.ones((b, t, s), bool)
  if causal:
    ok = ok & (kp <= qp)
  if window is not None:
    ok = ok & (qp - window < kp)
  if q_segment_ids is not None:
    ok = ok & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  if q_lengths is not None:
    ok = ok & (jnp.arange(t)[None, :, None] < jnp.asarray(q_lengths)[:, None, None])
  if kv_lengths is not None:
    ok = ok & (kp < jnp.asarray(kv_lengths)[:, None, None])
  return ok


def attention_reference(q_BTHD, k_BSKD, v_BSKD, *, scale: float, causal: bool = True,
                        window: int | None = None, q_segment_ids=None, kv_segment_ids=None,
                        kv_offset: int = 0, q_lengths=None, kv_lengths=None, out_dtype=None,
                        interpret: bool = False, block_q=None, block_k=None, num_warps=None,
                        num_stages=None):
  """Softmax attention in float32 (HIGHEST precision dots). Returns (out [B,T,H,D], lse [B,T,H]).

  `out` is cast to `out_dtype` (default: q's dtype); `interpret` and the kernels' tuning knobs
  (block sizes, warps, stages) are accepted and ignored so that the dispatcher can pass one set of
  arguments to every implementation.
  """
  del interpret, block_q, block_k, num_warps, num_stages
  check_attention_args(q_BTHD, k_BSKD, v_BSKD, scale=scale, causal=causal, window=window,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, kv_offset=kv_offset,
                       q_lengths=q_lengths, kv_lengths=kv_lengths)
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  q = q_BTHD.astype(jnp.float32).reshape(b, t, kh, g, d)
  k = k_BSKD.astype(jnp.float32)
  v = v_BSKD.astype(jnp.float32)
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", q, k, precision=lax.Precision.HIGHEST) * scale
  mask = visibility_mask(b, t, s, causal=causal, window=window, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, kv_offset=kv_offset, q_lengths=q_lengths,
                         kv_lengths=kv_lengths)[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)  # exp(-inf) = 0 for masked keys
  denom = jnp.sum(e, axis=-1, keepdims=True)
  seen = denom > 0
  p = e / jnp.where(seen, denom, 1.0)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", p, v, precision=lax.Precision.HIGHEST).reshape(b, t, h, d)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)[..., 0]  # [B, K, G, T]
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
  return out.astype(out_dtype or q_BTHD.dtype), lse



# -- block-sparse attention (layouts from sparse_index.py) ----------------------------------------
def check_block_sparse_args(q_BTHD, k_BSKD, v_BSKD, layout, columns, *, scale, causal):
  """Trace-time validation for block-sparse attention (shapes, dtypes, layout shapes). ValueError."""
  from lcinfer.pallas_kernels.sparse_index import BlockSparse, check_layout
  from lcinfer.pallas_kernels.vertical_slash import KeyRanges, check_ranges
  check_attention_args(q_BTHD, k_BSKD, v_BSKD, scale=scale, causal=causal, window=None,
                       q_segment_ids=None, kv_segment_ids=None, kv_offset=0, q_lengths=None,
                       kv_lengths=None)
  b, t, h, _ = q_BTHD.shape
  s = k_BSKD.shape[1]
  if causal and s != t:
    raise ValueError(f"causal block-sparse attention is self-attention (query i at position i): "
                     f"needs S == T, got T={t}, S={s}")
  if isinstance(layout, KeyRanges):
    check_ranges(layout, b, h, t)
    check_layout(BlockSparse(layout.count, layout.start, layout.block_q, layout.block_k), columns, b, h, t)
  else:
    check_layout(layout, columns, b, h, t)


def block_sparse_key_mask(layout, columns, t: int, s: int, causal: bool = True):
  """Boolean [B, H, T, S]: the key set of a layout (semantics in sparse_index.py). Reference and
  tests only: this is the dense mask that the kernel never builds."""
  bq, bk = layout.block_q, layout.block_k
  nk = -(-s // bk)
  j = jnp.arange(layout.kv_block_idx.shape[-1])
  ok = j < layout.count[..., None]
  blk = jnp.any((layout.kv_block_idx[..., None] == jnp.arange(nk)) & ok[..., None], axis=-2)  # [B,H,nq,nk]
  qb = jnp.arange(t) // bq
  mask = blk[:, :, qb][..., jnp.arange(s) // bk]                         # [B, H, T, S]
  if columns is not None:
    jc = jnp.arange(columns.index.shape[-1])
    okc = jc < columns.count[..., None]
    col = jnp.any((columns.index[..., None] == jnp.arange(s)) & okc[..., None], axis=-2)  # [B,H,nq,S]
    mask = mask | col[:, :, qb]
  if causal:
    mask = mask & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  return mask


def masked_attention_reference(q_BTHD, k_BSKD, v_BSKD, mask_BHTS, *, scale: float, out_dtype=None):
  """Float32 softmax attention under an explicit per-head boolean mask [B, H, T, S]; GQA by head
  count. Rows that see nothing: out = 0, lse = -inf. Returns (out [B,T,H,D], lse [B,T,H])."""
  b, t, h, d = q_BTHD.shape
  kh = k_BSKD.shape[2]
  g = h // kh
  q = q_BTHD.astype(jnp.float32).reshape(b, t, kh, g, d)
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", q, k_BSKD.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) * scale
  logits = jnp.where(mask_BHTS.reshape(b, kh, g, t, -1), logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  seen = denom > 0
  p = e / jnp.where(seen, denom, 1.0)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", p, v_BSKD.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST).reshape(b, t, h, d)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)[..., 0]
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
  return out.astype(out_dtype or q_BTHD.dtype), lse


def block_sparse_reference(q_BTHD, k_BSKD, v_BSKD, layout, *, scale: float, causal: bool = True,
                           columns=None, out_dtype=None, interpret: bool = False, num_warps=None,
                           num_stages=None):
  """Block-sparse attention in float32 from the dense key mask of `layout` (a BlockSparse or
  KeyRanges) (+ `columns`): the union semantics of sparse_index.py / vertical_slash.py, causal.
  Returns (out [B,T,H,D], lse [B,T,H]).
  `interpret` and the kernel's knobs are accepted and ignored (dispatcher)."""
  del interpret, num_warps, num_stages
  check_block_sparse_args(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=scale, causal=causal)
  from lcinfer.pallas_kernels.vertical_slash import KeyRanges, ranges_key_mask
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  if isinstance(layout, KeyRanges):
    mask = ranges_key_mask(layout, columns, t, s, causal)
  else:
    mask = block_sparse_key_mask(layout, columns, t, s, causal)
  return masked_attention_reference(q_BTHD, k_BSKD, v_BSKD, mask, scale=scale, out_dtype=out_dtype)
