"""The Hopper attention kernel's per-call inputs (`flash_mgpu.py` builds them, `flash_mgpu_kernel.py`
reads them): from any KeyRanges / BlockSparse layout and gathered columns, the canonical ascending
ranges per query block in the kernel's class order (ranges needing the column map, masked, whole),
the band [ea, eb) of each block, the column list's fields (steps, skipped band chunks, split mode's
shared chunks), and one meta row of N_META int32 fields per tile or query block (`flash_mgpu_kernel`'s
M_* names). All jnp, jittable, with no sort in the common path: the design and its measurements are
in `flash_mgpu.py`'s docstring."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels.flash_mgpu_kernel import (
    ALIGN, M_COLMASKED, M_COUNT, M_EA, M_EB, M_LAST, M_NCOLS, M_SA, M_SB, M_SCOL_FROM, M_SCOL_N,
    M_SCOL_TO, M_SHARED_AT, M_SHARED_N, M_SKIP_FROM, M_SKIP_TO, M_WHOLE, N_META, SHARED, SPLIT_Q, TILE_Q)
from lcinfer.pallas_kernels.sparse_index import stable_partition
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, ascending_ranges


def _pad_to(x, n, axis):
  if x.shape[axis] == n:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pads)


def _band(lo, hi, count):
  """Per query block, the key interval [ea, eb) of its run of touching ranges that ends at its
  highest range (for vertical-slash blocks: the near band up to the diagonal); empty without ranges.
  lo, hi [..., M] canonical and ascending (the first `count` valid)."""
  valid = jnp.arange(lo.shape[-1]) < count[..., None]
  slots = jnp.arange(lo.shape[-1])
  touches = jnp.concatenate([jnp.zeros_like(valid[..., :1]), lo[..., 1:] == hi[..., :-1]], axis=-1)
  first = jnp.max(jnp.where(valid & ~touches, slots, 0), axis=-1, keepdims=True)   # the run's first slot
  last = jnp.maximum(count - 1, 0)[..., None]
  ea = jnp.take_along_axis(lo, first, axis=-1)[..., 0]
  eb = jnp.take_along_axis(hi, last, axis=-1)[..., 0]
  return jnp.where(count > 0, ea, 0), jnp.where(count > 0, eb, 0)


def _column_inputs(columns, k, lo, hi, count, ea, eb, *, t, s, h, bk, bq, tp, split=False):
  """Columns mode: an ascending shared list (Columns.ascending) becomes gathered K/V rows per query
  head (kc, vc [B, Cp, H, D], from srt), per query row the number of list entries it attends (thr
  [B, H, Tp]: those <= the row, within its block's prefix), a key map of the list (colmap
  [B, H, Sp]) and per query block (bq rows) the column fields of the meta row. Each key is counted
  once: the list columns inside the block's band [ea, eb) (`_band`, list slots [sa, sb)) by the
  band's steps (the column steps skip those slots, and whole chunks of them), the others by the
  column steps; a range outside the band that holds one of the block's columns masks them with
  colmap (`colmasked`, [B, H, nq, M]), the band's ranges need no column mask. Split mode: a tile
  whose two blocks take fewer steps by walking the list together in SHARED-slot chunks (each
  masking its own band's slots and its rows' thresholds) than each in its own bk-slot chunks takes
  those (`_shared_columns`). Returns (colmasked, (n_steps, last, sa, sb, skip_from, skip_to,
  n_shared_cols, from, to), thr, colmap, srt)."""
  b, sp = k.shape[:2]
  nq = count.shape[-1]
  cols = columns.index[:, :, 0, :].astype(jnp.int32)                       # [B, H, n]
  n = cols.shape[-1]
  ccount = jnp.clip(columns.count, 0, n).astype(jnp.int32)                 # [B, H, nq]
  live = jnp.arange(n) < jnp.max(ccount, axis=-1, keepdims=True)          # entries a block takes
  chunk = SHARED if split else bk   # shared column steps load SHARED slots
  cp = pl.cdiv(n, chunk) * chunk
  srt = jnp.pad(jnp.where(live, cols, s), ((0, 0), (0, 0), (0, cp - n)), constant_values=s)
  bi, hi_ = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  colmap = jnp.zeros((b, h, sp), jnp.int32).at[bi, hi_, jnp.where(srt < s, srt, sp)].set(1, mode="drop")
  at, every = _count_below(srt, s, sp)
  thr = every(tp + 1)[..., 1:]                                            # entries <= the row
  per_row = jnp.broadcast_to(ccount[..., None], (b, h, nq, bq)).reshape(b, h, nq * bq)   # its block's count
  per_row = (per_row[..., :tp] if tp <= nq * bq else
             jnp.concatenate([per_row, jnp.broadcast_to(per_row[..., -1:], (b, h, tp - nq * bq))], axis=-1))
  thr = jnp.minimum(thr, per_row).astype(jnp.int32)
  last = jnp.where(ccount > 0, jnp.take_along_axis(srt, jnp.maximum(ccount - 1, 0), axis=-1), -1)
  sa, sb = jnp.minimum(at(ea), ccount), jnp.minimum(at(eb), ccount)
  # a range outside the band holding a block column (in [lo, min(hi, last + 1))) needs colmap
  n1, n2 = at(lo), at(jnp.minimum(hi, last[..., None] + 1))
  valid = jnp.arange(lo.shape[-1]) < count[..., None]
  colmasked = valid & (n2 > n1) & ~_in_band(lo, hi, ea, eb)
  # column chunks of bk slots: those wholly inside [sa, sb) are skipped
  n_chunks = pl.cdiv(ccount, bk)
  skip_from = pl.cdiv(sa, bk)
  skip_to = jnp.maximum(sb // bk, skip_from)
  n_steps = skip_from + n_chunks - skip_to
  zero = jnp.zeros_like(n_steps)
  shared = (zero, zero, zero)
  if split:
    n_steps, shared = _shared_columns(n_steps, ccount, sa, sb)
  return colmasked, (n_steps, last, sa, sb, skip_from, skip_to) + shared, thr, colmap, srt


def _count_below(srt, s: int, sp: int):
  """(at, every): at(x), the list entries < x, per head (x [B, H, ...] in [0, sp]), for an
  ascending, distinct list srt [B, H, n] (entries >= s unused): every count is two gathers from
  small tables, not a binary search. The list as a bitmap of 32-key words (bits [B, H, W + 1]
  uint32) and the entries before each word (before [B, H, W + 1]); at(x) = before[x // 32] +
  popcount(bits[x // 32] below bit x % 32). H200, 128K: the tables are 1 MB; a prefix sum of the
  [B, H, sp] key map (16 MB) and gathers from it took ~0.2 + 0.8 ms on 1000 columns. every(n):
  at(x) for x = 0 .. n - 1, [B, H, n], the same formula broadcast over each word's 32 keys (no
  gather; at(x) for x >= sp is the whole list, as at's clip gives)."""
  b, h, _ = srt.shape
  words = sp // 32 + 1
  ok = srt < s
  word = jnp.where(ok, srt // 32, words)                                  # unused: dropped
  bit = jnp.left_shift(jnp.uint32(1), (srt % 32).astype(jnp.uint32))
  bi, hi_ = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  bits = jnp.zeros((b, h, words), jnp.uint32).at[bi, hi_, word].add(bit, mode="drop")   # distinct: add = or
  per_word = lax.population_count(bits).astype(jnp.int32)
  before = jnp.cumsum(per_word, axis=-1) - per_word

  def at(x):
    xf = jnp.clip(x, 0, sp).reshape(b, h, -1)
    w = xf // 32
    below_bit = jnp.left_shift(jnp.uint32(1), (xf % 32).astype(jnp.uint32)) - jnp.uint32(1)
    got = jnp.take_along_axis(before, w, axis=-1) + lax.population_count(
        jnp.take_along_axis(bits, w, axis=-1) & below_bit).astype(jnp.int32)
    return got.reshape(x.shape)

  def every(n):
    below_bit = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32)) - jnp.uint32(1)
    table = (before[..., None] + lax.population_count(bits[..., None] & below_bit).astype(jnp.int32))
    table = table.reshape(b, h, words * 32)                               # at(x), x < words * 32
    if n <= words * 32:
      return table[..., :n]
    return jnp.concatenate([table, jnp.broadcast_to(table[..., -1:], (b, h, n - words * 32))], axis=-1)
  return at, every


def _shared_columns(n_steps, ccount, sa, sb):
  """Split mode: do a tile's two blocks walk their column lists together, in chunks of SHARED slots?
  Chunks wholly inside both blocks' band slots [sa, sb) are skipped; yes when that is fewer steps
  than the longer of their own walks (bk-slot chunks): on lists of more than bk columns. Returns
  (own column steps, 0 where shared; (shared steps, skipped chunks from, to) per block [B, H, nq],
  the tile's on both of its blocks)."""
  pair = lambda x: x.reshape(x.shape[:2] + (-1, 2))       # noqa: E731 (the tile's two blocks)
  n_chunks = pl.cdiv(jnp.max(pair(ccount), axis=-1), SHARED)
  skip_from = pl.cdiv(jnp.max(pair(sa), axis=-1), SHARED)
  skip_to = jnp.maximum(jnp.min(pair(sb), axis=-1) // SHARED, skip_from)
  n_shared = skip_from + n_chunks - skip_to
  share = n_shared < jnp.max(pair(n_steps), axis=-1)
  per_block = lambda x: jnp.repeat(jnp.where(share, x, 0), 2, axis=-1)  # noqa: E731
  return jnp.where(per_block(share) > 0, 0, n_steps), tuple(map(per_block, (n_shared, skip_from, skip_to)))


def _in_band(lo, hi, ea, eb):
  return (lo >= ea[..., None]) & (hi <= eb[..., None])


def _shared_band(lo, hi, count, ea, eb):
  """Split mode: does a tile's pair of blocks walk its bands in shared SHARED-key windows? Yes when
  both have one and the windows over their union are no more steps than the longer band's own
  ranges (the near band of vertical-slash: ~7 windows for 13 ranges); then each block's band
  ranges leave its list (`drop` [B, H, nq, M]). Returns (drop, first window [B, H, nq], windows)."""
  valid = jnp.arange(lo.shape[-1]) < count[..., None]
  in_band = valid & _in_band(lo, hi, ea, eb)
  has = eb > ea
  pair = lambda x: x.reshape(x.shape[:2] + (-1, 2))       # noqa: E731 (the tile's two blocks)
  a = jnp.min(jnp.where(pair(has), pair(ea), jnp.iinfo(jnp.int32).max), axis=-1)
  at = a - a % ALIGN
  n = pl.cdiv(jnp.max(jnp.where(pair(has), pair(eb), 0), axis=-1) - at, SHARED)
  share = jnp.all(pair(has), axis=-1) & (n <= jnp.max(pair(jnp.sum(in_band, axis=-1)), axis=-1))
  per_block = lambda x: jnp.repeat(jnp.where(share, x, 0), 2, axis=-1)  # noqa: E731
  return in_band & per_block(share)[..., None], per_block(at), per_block(n)


def _classify(lo, hi, count, whole, colmasked, drop):
  """The kernel's list order (it walks lists backwards): unmasked (0), masked (1), masked with the
  column map (2), then dropped and unused entries (3); whole [..., M]: entries every row sees whole.
  Returns (lo, hi, count, n_whole, n_colmasked)."""
  slots = jnp.arange(lo.shape[-1])
  keep = (slots < count[..., None]) & ~drop
  whole = whole & ~colmasked
  order = jnp.where(keep, jnp.where(whole, 0, jnp.where(colmasked, 2, 1)), 3)
  lo, hi = stable_partition(order, lo, hi)
  total = lambda x: jnp.sum(keep & x, axis=-1)   # noqa: E731
  return lo, hi, total(True), total(whole), total(colmasked)


def _gather_columns(x_BSKD, srt, h):
  """The list's K or V rows per query head, [B, Cp, H, D] (padding slots: any row, thr masks them)."""
  b, s, kh, _ = x_BSKD.shape
  bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  return jnp.transpose(x_BSKD[bi, jnp.minimum(srt, s - 1), hi // (h // kh)], (0, 2, 1, 3))


def _pad_blocks(n, *xs):
  """Per-query-block arrays [B, H, nq, ...] padded with zeros (empty blocks) to n blocks."""
  return [jnp.pad(x, [(0, 0), (0, 0), (0, n - x.shape[2])] + [(0, 0)] * (x.ndim - 3)) for x in xs]


def _query_blocks(t: int, split: bool):
  """(rows per query block of the lists, blocks nq, padded rows tp) for T = t queries."""
  bq = SPLIT_Q if split else TILE_Q
  nq = pl.cdiv(t, bq)
  if split:  # two blocks a tile; the last block's consumer reads (and computes) 8 rows past it
    nq = pl.cdiv(nq, 2) * 2
    return bq, nq, nq * bq + ALIGN
  return bq, nq, nq * bq


def _ranges_inputs(layout, columns, k, *, t, s, h, block_k, causal, split):
  """Ranges mode: the kernel's per-block inputs (meta [B, H, nq, N_META], lo, hi, thr, colmap, srt;
  without columns thr and colmap are `unread` placeholders and srt None) from any layout + columns.
  No comparison sort of the lists for the builders' (canonical) ranges: the band is read off the
  ascending lists, the class order is `stable_partition`, the column counts come from a 32-key
  bitmap of the list (`_count_below`; H200, 128K: 0.4-1.4 ms, from 4-11 ms with sorts and searches)."""
  from lcinfer.pallas_kernels.block_sparse import prepare_ranges
  bq, nq, tp = _query_blocks(t, split)
  if isinstance(layout, KeyRanges):   # ascending (the builders' lists: as they are, no sort)
    lo, hi, count, whole, cols = ascending_ranges(layout, columns, t, s, causal, align=ALIGN)
  else:                               # ascending blocks, the whole ones a prefix
    lo, hi, count, n_whole, cols = prepare_ranges(layout, columns, t, s, causal)
    whole = jnp.arange(lo.shape[-1]) < n_whole[..., None]
  lo, hi, count, whole = _pad_blocks(nq, lo.astype(jnp.int32), hi.astype(jnp.int32), count, whole)
  zero = jnp.zeros_like(count)
  ea = eb = zero   # the band: only columns and split mode use it
  if split or columns is not None:
    ea, eb = _band(lo, hi, count)
  drop, at, n_shared = jnp.zeros(lo.shape, bool), zero, zero
  if split:
    drop, at, n_shared = _shared_band(lo, hi, count, ea, eb)
  colmasked = jnp.zeros(lo.shape, bool)
  col_fields = (zero,) * 9
  thr = colmap = jnp.zeros((1, 1, 1), jnp.int32)   # unread
  srt = None
  if columns is not None:
    cols = dataclasses.replace(cols, count=_pad_blocks(nq, cols.count)[0])
    colmasked, col_fields, thr, colmap, srt = _column_inputs(cols, k, lo, hi, count, ea, eb, t=t, s=s, h=h,
                                                             bk=block_k, bq=bq, tp=tp, split=split)
  lo, hi, count, n_whole, n_colmasked = _classify(lo, hi, count, whole, colmasked, drop)
  n_steps, last, sa, sb, skip_from, skip_to, n_scol, scol_from, scol_to = col_fields
  fields = [None] * N_META
  for i, x in ((M_COUNT, count), (M_WHOLE, n_whole), (M_NCOLS, n_steps), (M_LAST, last),
               (M_COLMASKED, n_colmasked), (M_SA, sa), (M_SB, sb), (M_SKIP_FROM, skip_from),
               (M_SKIP_TO, skip_to), (M_EA, ea), (M_EB, eb), (M_SHARED_AT, at), (M_SHARED_N, n_shared),
               (M_SCOL_N, n_scol), (M_SCOL_FROM, scol_from), (M_SCOL_TO, scol_to)):
    fields[i] = x
  return jnp.stack(fields, axis=-1).astype(jnp.int32), lo, hi, thr, colmap, srt
