"""Diagonal attention in plain XLA: the fallback of `diagonal_attention` where no kernel runs (a TPU,
a GPU without Triton, a CPU without interpret mode), in memory linear in the sequence.

The oracle (`diagonals.diagonal_reference`) builds [B, H, T, S] masks: 34 GB of booleans at 32K with
32 heads. This one walks the offsets in a `lax.scan`, one diagonal a step: the key and value rows
i - o of the rows i are one contiguous window of each KV head's rows (a dynamic slice per query head,
GQA without repeats), one logit a row, online softmax (`online_softmax.update_rows`, base 2;
the accumulator [B, K, G, T, D] in float32), then the keys of the row's block that `exclude` or
`exclude_columns` hold dropped (they are counted by the call this one is merged with). Same
contract and result as `diagonals.diagonal_attention`; the kernel's knobs are accepted and ignored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels.diagonals import _check_args, canonical_offsets, column_slots, merged_with
from lcinfer.pallas_kernels.sparse_index import Columns
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, _clipped


def diagonal_attention_xla(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, *, scale: float, exclude: KeyRanges | None = None,
                           exclude_columns: Columns | None = None, merge_with=None, block_q: int = 64,
                           diagonals_per_step=None, heads_first=None, programs=None, descending=None,
                           interpret=None, num_warps=None, num_stages=None):
  """`diagonals.diagonal_attention`'s contract in plain XLA (module docstring). Returns (out
  [B, T, H, D] in q's dtype, lse [B, T, H] f32)."""
  del diagonals_per_step, heads_first, programs, descending, interpret, num_warps, num_stages
  _check_args(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, block_q, merge_with)
  out, lse = _scan(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, scale=float(scale),
                   block_q=block_q)
  return merged_with((out, lse), merge_with, q_BTHD.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q"))
def _scan(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, *, scale, block_q):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  nq = -(-t // block_q)
  split = lambda x: x.reshape(b, kh, g, *x.shape[2:])                     # noqa: E731 [B, H, ...] -> [B, K, G, ...]
  q = split(jnp.transpose(q_BTHD, (0, 2, 1, 3)).astype(jnp.float32) * (scale * osm.LOG2E))  # [B, K, G, T, D]
  # [B, K, S + S, D]: S rows of zeros in front, so that the rows i - o of a diagonal are one window
  k, v = (jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (s, 0), (0, 0))) for x in (k_BSKD, v_BSKD))
  rows = jnp.arange(t, dtype=jnp.int32)
  offs = jnp.moveaxis(split(canonical_offsets(offsets_BHF, s)), -1, 0)             # [F, B, K, G]; 2S: none
  by_block = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, nq * block_q - t),)).reshape(b, kh, g, nq, block_q)  # noqa: E731
  if exclude is not None:     # the block's ranges, to compare each row's key against (no [T, M] gather)
    lo, hi, listed = (split(x) for x in _clipped(exclude, s))                      # [B, K, G, nq, M]
    lo, hi = jnp.where(listed, lo, 0)[..., None, :], jnp.where(listed, hi, 0)[..., None, :]
  if exclude_columns is not None:   # each key's first slot in the shared list (n: not listed)
    slot, n = column_slots(exclude_columns, s)
    slot = split(slot)                                                             # [B, K, G, S]
    count = split(jnp.clip(exclude_columns.count, 0, n).astype(jnp.int32))[..., rows // block_q]  # [B, K, G, T]

  def dropped(key):                      # key [B, K, G, T] in [0, S): held by the other call's lists
    out = jnp.zeros(key.shape, bool)
    if exclude is not None:
      kb = by_block(key)[..., None]                                                # [B, K, G, nq, bq, 1]
      out |= jnp.any((kb >= lo) & (kb < hi), axis=-1).reshape(b, kh, g, -1)[..., :t]
    if exclude_columns is not None:
      out |= jnp.take_along_axis(slot, key, axis=-1) < count
    return out

  def window(x, o):                      # x [B, K, 2S, D], o [B, K, G] -> rows i - o: [B, K, G, T, D]
    one = lambda x, o: lax.dynamic_slice_in_dim(x, s - o, t, axis=0)         # noqa: E731 (o = 2S: clamped, unused)
    return jax.vmap(jax.vmap(jax.vmap(one, in_axes=(None, 0))))(x, o).astype(jnp.float32)

  def step(carry, o):                    # o [B, K, G]: one diagonal of every head
    key = rows - o[..., None]                                                      # [B, K, G, T]
    ok = (key >= 0) & (key < s)
    key = jnp.clip(key, 0, s - 1)
    ok &= ~dropped(key)
    logit = jnp.where(ok, jnp.sum(q * window(k, o), axis=-1), -jnp.inf)          # base 2
    return osm.update_rows(carry, [logit], [window(v, o)]), None

  init = (jnp.zeros((b, kh, g, t, d)), jnp.full((b, kh, g, t), -jnp.inf), jnp.zeros((b, kh, g, t)))
  out, lse = osm.finish(lax.scan(step, init, offs)[0])
  return (jnp.transpose(out.reshape(b, h, t, d), (0, 2, 1, 3)),
          jnp.transpose(lse.reshape(b, h, t), (0, 2, 1)))


dispatch.register("diagonal_attention", "xla", diagonal_attention_xla)
