"""Kernel bodies of the diagonal attention (`diagonals.py`: the method, its launch and its oracle).

Pallas with the Triton lowering (interpret mode on CPU). `_kernel`: one program per (query block,
batch, head), its refs that block's (BlockSpecs). `_persistent_kernel`: a few programs that walk
the same items with whole refs. Both run `_attend_block`: per query block a `fori_loop` over the
head's ascending offsets up to the block's last row, gathering the block_q key rows i - o, logits
by an elementwise product and a row sum, online softmax (exp2) with one key a row, `per_step`
diagonals sharing one rescale; then the block-sparse call's (out, lse) merged in the epilogue.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import online_softmax as osm


def _attend_block(q, q_pos, n_offsets, offset, kv_rows, excluded, *, qk_scale, s_valid, per_step, descending):
  """One query block over its diagonals: q [block_q, d] f32 at rows q_pos; offset(j) the j-th
  ascending offset; kv_rows(keys) the (k, v) rows [block_q, d]; excluded(keys) bool [block_q] or
  None; descending: the offsets walked from the largest. Returns (out [block_q, d] f32, lse [block_q])."""
  def one(j):
    """The block's keys on diagonal j: (base-2 logits [block_q], -inf where not taken; v rows)."""
    if descending:   # past the count: index < 0, an offset 2S (keys < 0, not taken)
      idx = n_offsets - 1 - j
      keys = q_pos - jnp.where(idx >= 0, offset(jnp.maximum(idx, 0)), 2 * s_valid)
    else:
      keys = q_pos - offset(j)             # past the count: offsets > the block's rows or 2S
    ok = (keys >= 0) & (keys < s_valid)
    keys = jnp.clip(keys, 0, s_valid - 1)
    if excluded is not None:   # counted by the block-sparse call
      ok = ok & ~excluded(keys)
    k, v = kv_rows(keys)
    return jnp.where(ok, jnp.sum(q * k.astype(jnp.float32), axis=1) * qk_scale, -jnp.inf), v.astype(jnp.float32)

  def body(step, carry):   # per_step diagonals share one rescale of the accumulator
    return osm.update_rows(carry, *zip(*(one(step * per_step + i) for i in range(per_step))))

  n_steps = lax.div(n_offsets + per_step - 1, per_step)
  return osm.finish(lax.fori_loop(0, n_steps, body, osm.init(q.shape[0], q.shape[-1])))


def _merge(out, lse, out_m, lse_m):
  """The other key set's (out, lse) merged into this one (merge_attention's formula), in the
  epilogue instead of another pass over both outputs."""
  top = jnp.maximum(lse, lse_m)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  w, w_m = jnp.exp(lse - top), jnp.exp(lse_m - top)
  total = w + w_m
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  out = (w[:, None] * out + w_m[:, None] * out_m.astype(jnp.float32)) / total[:, None]
  return out, jnp.where(seen, top + jnp.log(total), -jnp.inf)


def _unpack(refs, has_ranges, has_cols, has_merge, aliased):
  q_ref, k_ref, v_ref, meta_ref, off_ref, *rest = refs
  lo_ref = hi_ref = colpos_ref = mo_ref = mlse_ref = None
  if has_ranges:
    lo_ref, hi_ref, *rest = rest
  if has_cols:
    colpos_ref, *rest = rest
  if has_merge:
    mo_ref, mlse_ref, *rest = rest
  if aliased:
    rest = rest[2:]  # NaN-filled buffers aliased to the outputs; never read
  return (q_ref, k_ref, v_ref, meta_ref, off_ref, lo_ref, hi_ref, colpos_ref, mo_ref, mlse_ref, *rest)


def _excluded(lo, hi, colpos, ccount):
  """keys -> bool [block_q]: inside one of the block's ranges [lo, hi) or at a column slot < ccount."""
  if lo is None and colpos is None:
    return None

  def excluded(keys):
    out = jnp.zeros(keys.shape, bool)
    if lo is not None:
      out = out | (jnp.max(((keys[:, None] >= lo[None, :]) & (keys[:, None] < hi[None, :])).astype(jnp.int32),
                           axis=1) == 1)
    if colpos is not None:
      out = out | (colpos(keys) < ccount)
    return out
  return excluded


def _kernel(*refs, qk_scale, block_q, s_valid, per_step, descending, qb_axis, has_ranges, has_cols, has_merge,
            aliased):
  """One program per (query block, batch, head): the refs are that block's (BlockSpecs)."""
  (q_ref, k_ref, v_ref, meta_ref, off_ref, lo_ref, hi_ref, colpos_ref, mo_ref, mlse_ref, o_ref,
   lse_ref) = _unpack(refs, has_ranges, has_cols, has_merge, aliased)
  q_pos = pl.program_id(qb_axis) * block_q + jnp.arange(block_q, dtype=jnp.int32)
  excluded = _excluded(lo_ref[...] if has_ranges else None, hi_ref[...] if has_ranges else None,
                       (lambda keys: colpos_ref[keys]) if has_cols else None, meta_ref[1])
  out, lse = _attend_block(q_ref[...].astype(jnp.float32), q_pos, meta_ref[0], lambda j: off_ref[j],
                           lambda keys: (k_ref[keys, :], v_ref[keys, :]), excluded,
                           qk_scale=qk_scale, s_valid=s_valid, per_step=per_step, descending=descending)
  if has_merge:
    out, lse = _merge(out, lse, mo_ref[...], mlse_ref[...])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _persistent_kernel(*refs, qk_scale, block_q, s_valid, per_step, descending, programs, n_items, heads, batch,
                       group, has_ranges, has_cols, has_merge, aliased):
  """`programs` programs, each taking the work items pid, pid + programs, ... (item w: head
  w % H, batch (w // H) % B, query block w // (H B), the grid kernel's order); refs whole."""
  (q_ref, k_ref, v_ref, meta_ref, off_ref, lo_ref, hi_ref, colpos_ref, mo_ref, mlse_ref, o_ref,
   lse_ref) = _unpack(refs, has_ranges, has_cols, has_merge, aliased)
  pid = pl.program_id(0)

  def item(n, carry):
    w = pid + n * programs
    head, bi, i = w % heads, (w // heads) % batch, w // (heads * batch)
    kv = head // group
    q0 = pl.multiple_of(i * block_q, block_q)
    rows = pl.ds(q0, block_q)
    excluded = _excluded(lo_ref[bi, head, i, :] if has_ranges else None,
                         hi_ref[bi, head, i, :] if has_ranges else None,
                         (lambda keys: colpos_ref[bi, head, keys]) if has_cols else None, meta_ref[bi, head, i, 1])
    out, lse = _attend_block(q_ref[bi, rows, head, :].astype(jnp.float32), q0 + jnp.arange(block_q, dtype=jnp.int32),
                             meta_ref[bi, head, i, 0], lambda j: off_ref[bi, head, j],
                             lambda keys: (k_ref[bi, keys, kv, :], v_ref[bi, keys, kv, :]), excluded,
                             qk_scale=qk_scale, s_valid=s_valid, per_step=per_step, descending=descending)
    if has_merge:
      out, lse = _merge(out, lse, mo_ref[bi, rows, head, :], mlse_ref[bi, head, rows])
    o_ref[bi, rows, head, :] = out.astype(o_ref.dtype)
    lse_ref[bi, head, rows] = lse
    return carry

  lax.fori_loop(0, lax.div(n_items - pid + programs - 1, programs), item, 0)
