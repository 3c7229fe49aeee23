"""The consumer warpgroups of the Hopper attention kernel (`flash_mgpu_kernel.py` launches them;
design and modes: `flash_mgpu.py`). Each owns 64 query rows (split mode: computes 64, owns the
first SPLIT_Q) and walks the tile's KV stream: S = Q K^T, mask, online softmax in base 2 with the
lazy maximum, O += P V; the two consumers ping-pong on a shared barrier."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import mgpu_inline as mi
from lcinfer.pallas_kernels.flash_mgpu_kernel import (
    ALIGN, M_COLMASKED, M_EA, M_EB, M_LAST, M_SA, M_SB, M_SKIP_FROM, M_SKIP_TO, NARROW, ROWS_PER_WG,
    SHARED, SPLIT_Q, TILE_Q, Geometry, _column_chunk, _entry, _is_narrow, _plgpu, _Refs, _stream, _window,
    region, shared_column_rows, shared_window, split_steps)
from lcinfer.pallas_kernels.online_softmax import LN2, LOG2E


def consumer(g: Geometry, r: _Refs, scoped, wg, tile, b, h):
  plgpu = _plgpu()
  (qo_smem2, k_smem, v_smem, lse_smem2, flags2, *p_smem2), (k_full, v_full, q_bar), (k_free, v_free), sched = scoped
  bk, d = g.block_k, g.d
  qo_smem, lse_smem, flags = qo_smem2.at[wg], lse_smem2.at[wg], flags2.at[wg]
  p_smem = p_smem2[0].at[wg] if g.interpret else None   # interpret mode: P through shared memory
  j0 = jnp.int32(0)   # the step of the list's first entry (split mode: after the shared windows)
  if g.split:  # the consumer's own query block and list, in its half of each slot
    blk = 2 * tile + wg
    q_base = pl.multiple_of(blk * SPLIT_Q, ALIGN)
    st = split_steps(g, r, tile, b, h)
    shared_at, n_shared, n_own_steps = st.at, st.n_shared, st.n_own
    j0 = st.first_own
    band_lo, band_hi = r.meta[b, h, blk, M_EA], r.meta[b, h, blk, M_EB]
  else:
    blk = tile
    q_base = tile * TILE_Q + wg * ROWS_PER_WG
  n_list, n_whole, n_cols = _stream(g, r, blk, b, h)
  plgpu.set_max_registers(232, action="increase")

  def sync():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  plgpu.copy_gmem_to_smem(r.q.at[b, pl.ds(q_base, ROWS_PER_WG), h], qo_smem, q_bar.at[wg])
  with region("q_wait"):
    plgpu.barrier_wait(q_bar.at[wg])
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout, col_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
  m = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), row_layout)
  l = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), row_layout)
  acc = plgpu.layout_cast(jnp.full((ROWS_PER_WG, d), 0.0, jnp.float32), wgmma_layout)
  c = g.scale * LOG2E  # logits in base 2: p = 2^(s c - m)
  iota = lambda w, dim: plgpu.broadcasted_iota(jnp.int32, (ROWS_PER_WG, w), dim, layout=wgmma_layout)  # noqa: E731
  col_iota = lambda w: plgpu.broadcasted_iota(jnp.int32, (w,), 0, layout=col_layout)  # noqa: E731
  by_col = lambda x: lax.broadcast_in_dim(x, (ROWS_PER_WG, x.shape[0]), [1])      # noqa: E731
  by_row = lambda x, w: lax.broadcast_in_dim(x, (ROWS_PER_WG, w), [0])           # noqa: E731
  bias = lambda keep: jnp.where(keep, 0.0, -jnp.inf)          # noqa: E731
  any_above = mi.any_above_fn(row_layout) if g.lazy_max else None
  if g.lazy_max and g.interpret:   # the warp vote is inline PTX: interpret mode takes jnp.any
    any_above = lambda mx, bound, flags: jnp.any(mx > bound)   # noqa: E731
  if g.columns:
    thr = plgpu.load(r.thr.at[b, h, pl.ds(q_base, ROWS_PER_WG)], layout=row_layout, optimized=False)
    thr_first = r.thr[b, h, q_base]   # rows ascend: the fewest columns of the warpgroup's rows
    last_col = r.meta[b, h, blk, M_LAST]
    band_from, band_to = r.meta[b, h, blk, M_SA], r.meta[b, h, blk, M_SB]
    skip_from, skip_to = r.meta[b, h, blk, M_SKIP_FROM], r.meta[b, h, blk, M_SKIP_TO]

  def key_bias(j, kind, entry, w):
    """Step j's per-key part of the mask as a [w] bias (0 or -inf; None: no mask), the first key
    (or list slot) of its window, and whether the bias masks anything (a uniform scalar). Computed
    before the step waits for its K tile, so that the loads it needs (the column map) are not on
    the critical path."""
    if kind == "whole":
      return None, None, None
    if kind in ("columns", "shared_columns"):  # slots of the sorted list minus the band's
      if kind == "columns":
        c0 = _column_chunk(j - j0 - n_list, skip_from, skip_to) * bk
      else:
        c0 = shared_column_rows(j, st)
      slot = c0 + col_iota(w)   # the add only on chunks that hold band slots (most hold none)
      return bias((slot < band_from) | (slot >= band_to)), c0, (c0 < band_to) & (c0 + w > band_from)
    if kind == "shared":  # the window's keys in the consumer's own band
      start, lo = shared_window(g, shared_at, n_shared, j)
      lo, hi = jnp.maximum(lo, band_lo), jnp.minimum(lo + SHARED, band_hi)
      k_col = start + col_iota(w)
      return bias((k_col >= lo) & (k_col < hi)), start, (lo > start) | (hi < start + w)
    lo, hi = entry
    start = _window(g, lo, w)
    k_col = start + col_iota(w)
    keep = (k_col >= lo) & (k_col < hi)
    if kind == "colmasked":  # a key of the range that is also one of the tile's columns is counted there
      is_col = plgpu.load(r.colmap.at[b, h, pl.ds(start, w)], layout=col_layout, optimized=False)
      keep = keep & ((is_col == 0) | (k_col > last_col))
    return bias(keep), start, None

  def masked(kind, s, key_mask, w):
    """s with the keys of the step that it does not count at -inf: the per-key bias added (shared
    windows and column chunks: only where it masks something), the per-row part only on the steps
    that need it (lax.cond, uniform)."""
    col_bias, start, partial = key_mask
    if col_bias is None:
      return s
    if partial is None:
      s = s + by_col(col_bias)
    else:
      s = lax.cond(partial, lambda s: s + by_col(col_bias), lambda s: s, s)
    if kind in ("columns", "shared_columns"):  # row i attends the first thr[i] slots
      return lax.cond(start + w <= thr_first, lambda s: s,
                      lambda s: jnp.where(start + iota(w, 1) < by_row(thr, w), s, -jnp.inf), s)
    if g.causal:
      s = lax.cond(start + w - 1 > q_base,
                   lambda s: jnp.where(start + iota(w, 1) <= q_base + iota(w, 0), s, -jnp.inf), lambda s: s, s)
    return s

  def rescale(args):  # the running max moves: the sums and O in its new units
    mx, m, acc, l = args
    m_new = jnp.maximum(m, mx)
    alpha = jnp.exp2(m - mi.finite(m_new))
    return m_new, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), l * alpha

  def tiles(slot, kind, w):
    """The K and V tiles of a step in ring slot `slot`."""
    k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
    if g.split and kind not in ("shared", "shared_columns"):   # the consumer's half
      half = pl.ds(pl.multiple_of(wg * bk, bk), bk)
      return k_smem.at[slot, half], v_smem.at[slot, half]
    if w != k_tile.shape[0]:
      return k_smem.at[slot, pl.ds(0, w)], v_smem.at[slot, pl.ds(0, w)]
    return k_tile, v_tile

  def body(j, kind, entry, w, carry):
    """One step of w keys (block_k, NARROW for a narrow step, SHARED for a shared window)."""
    acc, m, l = carry
    with region(f"{kind}.bias"):
      key_mask = key_bias(j, kind, entry, w)
    slot = lax.rem(j, jnp.int32(g.stages))
    k_tile, v_tile = tiles(slot, kind, w)
    with region(f"{kind}.wait_k"):
      plgpu.barrier_wait(k_full.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, qo_smem, k_tile.transpose((1, 0)))
      sync()
      return acc_ref[...]
    with region(f"{kind}.qk"):   # the wgmma, the ping-pong turn, the wait for the result
      s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WG, w), jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])
    with region(f"{kind}.softmax"):
      s = masked(kind, s, key_mask, w)
      mx = s.max(axis=1) * c
      if g.lazy_max:  # most steps: no logit passes m + TAU, so m stays and nothing is rescaled
        votes = flags.at[lax.rem(j, 2)]   # two sets: a warp a step ahead never overwrites unread flags
        m, acc, l = lax.cond(any_above(mx, m + mi.LAZY_TAU, votes), rescale, lambda a: a[1:],
                             (mx, m, acc, l))
      else:
        m, acc, l = rescale((mx, m, acc, l))
      p = jnp.exp2(s * c - by_row(mi.finite(m), w))
      l = l + p.sum(axis=1)
      p16 = p.astype(g.dtype)
      acc, l, m, p16 = lax.optimization_barrier((acc, l, m, p16))
    with region(f"{kind}.wait_v"):   # the other consumer's turn, then the V tile
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_full.at[slot])
      plgpu.barrier_wait(sched)

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_tile)
    with region(f"{kind}.pv"):
      if g.interpret:   # interpret mode's wgmma reads both operands from shared memory and has no
        p_ref = p_smem.at[:, pl.ds(0, w)]   # accumulator initialized from registers
        p_ref[...] = p16
        acc = acc + pl.run_scoped(lambda r: (plgpu.wgmma(r, p_ref, v_tile), r[...])[1],
                                  plgpu.ACC(acc.shape, jnp.float32))
      else:
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m, l

  def step(j, carry, kind):
    acc, m, l, entry = carry
    if kind in ("whole", "columns", "shared", "shared_columns"):  # no later step reads its entry (the
      next_entry = entry   # loops run shared, shared_columns, colmasked, masked, whole, columns): no load
    else:  # the next step's entry, a step ahead
      next_entry = _entry(g, r, n_list - 2 - (j - j0), b, h, blk)
    w = SHARED if kind in ("shared", "shared_columns") else bk
    if g.narrow and kind in ("masked", "colmasked"):  # both warpgroups take the same branch
      acc, m, l = lax.cond(_is_narrow(entry), functools.partial(body, j, kind, entry, NARROW),
                           functools.partial(body, j, kind, entry, bk), (acc, m, l))
    else:
      acc, m, l = body(j, kind, entry, w, (acc, m, l))
    return acc, m, l, next_entry

  def idle(j):
    """Split mode, the other consumer's list is longer: the step's barriers without the work."""
    slot = lax.rem(j, jnp.int32(g.stages))
    with region("idle"):
      plgpu.barrier_wait(k_full.at[slot])
      sync()
      plgpu.barrier_arrive(k_free.at[slot])
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_full.at[slot])
      plgpu.barrier_wait(sched)
      plgpu.barrier_arrive(v_free.at[slot])

  pl.when(wg == 1)(sync)
  carry = (acc, m, l, _entry(g, r, n_list - 1, b, h, blk))
  if g.split:
    carry = lax.fori_loop(0, n_shared, functools.partial(step, kind="shared"), carry)
    if g.columns:
      carry = lax.fori_loop(n_shared, j0, functools.partial(step, kind="shared_columns"), carry)
  n_masked = n_list - n_whole  # the list runs backwards: its masked entries first
  n_colmasked = r.meta[b, h, blk, M_COLMASKED] if g.columns else jnp.int32(0)
  loops = (("colmasked", 0, n_colmasked), ("masked", n_colmasked, n_masked), ("whole", n_masked, n_list),
           ("columns", n_list, n_list + n_cols))
  for kind, lo, hi in loops:
    if kind not in ("colmasked", "columns") or g.columns:   # those needing the column map come first
      carry = lax.fori_loop(j0 + lo, j0 + hi, functools.partial(step, kind=kind), carry)
  if g.split:
    pl.loop(j0 + n_list + n_cols, j0 + n_own_steps)(idle)
  acc, m, l, _ = carry
  with region("end_sync"):
    pl.when(wg == 0)(sync)

  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
  qo_smem[...] = acc.astype(g.dtype)
  lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
  plgpu.commit_smem()
  if g.split:  # the 56 rows of its own block (the 8 past them belong to the next block)
    qo_smem, lse_smem = qo_smem.at[pl.ds(0, SPLIT_Q)], lse_smem.at[pl.ds(0, SPLIT_Q)]
  plgpu.copy_smem_to_gmem(qo_smem, r.out.at[b, pl.ds(q_base, g.rows), h])
  plgpu.copy_smem_to_gmem(lse_smem, r.lse.at[b, h, pl.ds(q_base, g.rows)])
  with region("store_wait"):
    # the CTA may end once the stores have read shared memory; the kernel's end flushes them
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
