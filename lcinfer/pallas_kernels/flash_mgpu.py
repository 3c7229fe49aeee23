"""Hopper attention forward, dense and key-range (block-sparse, vertical-slash) modes, as a Pallas
kernel with the Mosaic GPU lowering: wgmma tensor-core products, TMA loads, warp specialization
(FlashAttention-3, Shah et al. 2024, Sec. 3.1 producer/consumer warpgroups and Sec. 3.2 ping-pong
scheduling of two consumer warpgroups; the online softmax of FlashAttention-2, Algorithm 1, base 2).

    out_BTHD, lse_BTH = flash_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, scale=d ** -0.5, causal=True)
    out_BTHD, lse_BTH = block_sparse_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, layout, scale=...,
                                                    causal=True, columns=None)

One CTA per (query head, query tile of 128 rows, batch), heads the fastest grid axis, heaviest
tile first. Three warpgroups: two consumers own 64 query rows each and share one stream of K/V
blocks that the third (the producer, few registers) copies by TMA into a `stages`-deep ring of
shared-memory slots. Per step a consumer computes S = Q K^T (wgmma, float32 accumulators), masks
only where the step needs it, folds S into its running (max, sum) in base 2, and adds P V (wgmma,
P from registers in the input dtype). The consumers meet at a shared barrier twice per step, one
step out of phase, so that one's softmax overlaps the other's products.

Grid order and L2 (H100, 128K, measured): with tiles the fastest axis and keys ascending, each
newly started CTA rereads its head's K/V (64 MB, more than the 50 MB L2) from key 0 and the kernel
is bandwidth-bound (0.72x cuDNN); keys descending lift that to 0.93x, heads fastest to 1.09x, and
block-sparse at 10% from 6.2x to 9.5x cuDNN dense. The stream runs each tile's list backwards
(nearest the diagonal first).

A tile's stream:
  * dense mode: KV blocks up to the diagonal (causal) or all of them; only the diagonal block and
    a padded tail are masked;
  * ranges mode: the canonical ranges of `vertical_slash.ascending_ranges` (sorted, disjoint,
    clipped; those that every row of the tile sees whole need no mask), each split to lie in one
    8-aligned window of block_k keys (the tiled shared-memory layout needs TMA row offsets that are
    multiples of 8; the vertical-slash builder cuts its pieces that way and marks its lists
    canonical, so they are taken without any sort); the window is loaded, keys outside [lo, hi)
    and above the diagonal masked. With block_k 128, a range that fits the 8-aligned 64-key
    window at its start takes a narrow step (a 64-row TMA into the slot, [64, 64] products): a far
    slash spans 128 keys at an unaligned offset, one 128-key step plus a narrow one for its last
    < 8 keys, where two full steps were needed (measured on the H100: 5-9% faster on every
    vertical-slash set than either 128x64 or 128x128 without narrow steps);
  * then, with gathered columns (one ascending list per head, MInference's verticals), chunks of
    block_k of them: their K/V rows gathered per query head beforehand (contiguous, so TMA loads
    them like any block), row i attending the first thr[i] of the list (those <= i within the
    tile's prefix; one [64] load per warpgroup). Each key is counted once. The list columns
    inside the tile's band (its run of touching ranges that ends at its highest range: the near
    slashes up to the diagonal) are counted by the range steps, and the column steps skip their
    slots [sa, sb) (whole chunks of them are not loaded); so the band's ranges stay unmasked when
    whole. A range outside the band that holds one of the tile's columns masks them with a per-head
    map of the list (a [block_k] load; those ranges run first).
  * split mode (layouts of block_q SPLIT_Q = 56, block_k 64; a tile is two query blocks): each
    consumer owns one 56-row block (it computes 64 rows: wgmma's M) and its own list, in its own
    64-key half of every ring slot. A range of at most 56 + 7 keys fits one 8-aligned 64-key window,
    so a far slash (56 keys per 56 rows, at any offset) costs one 64-key step per consumer, against
    192 keys per 128 rows in the shared-tile mode (H200, 128K: (30, 800) 8.6x -> 12.0x cuDNN). The
    two blocks' bands (their near slashes), which overlap but for 56 keys, are walked first in
    SHARED = 128-key windows that both consumers take, each masking the keys outside its own band
    (when those windows are no more steps than the longer band's own ranges; `_shared_band`); then,
    when the tile's blocks take more than 64 columns, the column list in SHARED-slot chunks that both
    consumers take (each masking its own band's slots and its rows' thresholds; half the steps of
    each walking its own 64-slot chunks; `_shared_columns`); then each consumer's other ranges (and
    column chunks when not shared); the shorter list idles to keep the ping-pong.
    The slot's full barrier takes two arrivals a phase (two half copies, or one copy and a bare
    arrival), so that both consumers wait on every phase of every slot.
Masks are per key where they can be (a [block_k] bias added to S); the per-row part (causal, or a
column chunk that some rows of the warpgroup do not reach) runs only on the steps that need it,
under a uniform lax.cond. A range step's (lo, hi) is read a step ahead (a loop carry).
Lazy maximum (FlashAttention-4's conditional rescaling): the running max m, and with it the
rescaling of O and the sums, moves only when a logit passes m by LAZY_TAU = 8 (base 2), decided by
a warpgroup vote (`mgpu_inline.any_above_fn`); P <= 2^8 is exact enough in bf16 and float32.
A row that sees nothing gets out = 0, lse = -inf. Only bf16 / f16, head_dim 64 or 128, layouts of
block_q x block_k 128x64, 128x128 or 56x64 (`LAYOUT_BLOCKS`). Mosaic GPU has no interpret mode for
wgmma: the tests run the kernel compiled on a Hopper GPU; on CPU its lowering is tested.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.flash_mgpu_kernel import (
    ALIGN, HEAD_DIMS, M_COLMASKED, M_COUNT, M_EA, M_EB, M_LAST, M_NCOLS, M_SA, M_SB, M_SCOL_FROM, M_SCOL_N,
    M_SCOL_TO, M_SHARED_AT, M_SHARED_N, M_SKIP_FROM, M_SKIP_TO, M_WHOLE, N_META, SHARED, SPLIT_Q, TILE_Q,
    Geometry, call_kernel)
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.reference import check_attention_args, check_block_sparse_args
from lcinfer.pallas_kernels.sparse_index import stable_partition
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, ascending_ranges

__all__ = ["flash_attention_mgpu", "block_sparse_attention_mgpu", "TILE_Q", "SPLIT_Q", "LAYOUT_BLOCKS"]

# (block_q, block_k) of the layouts served: a 128-row tile shared by both consumers, or split mode
# (each consumer its own 56-row block and 64-key windows).
LAYOUT_BLOCKS = ((TILE_Q, 64), (TILE_Q, 128), (SPLIT_Q, 64))


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


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_k", "stages", "heads_fastest", "lazy_max",
                                             "narrow", "profile"))
def _run(q_BTHD, k_BSKD, v_BSKD, layout, columns, *, scale, causal, block_k, stages, heads_fastest,
         lazy_max=True, narrow=True, profile=()):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  split = layout is not None and layout.block_q == SPLIT_Q
  _, _, tp = _query_blocks(t, split)
  sp = max(pl.cdiv(s, block_k), 1) * block_k
  if split:  # a shared window loads SHARED keys
    sp = max(sp, SHARED)
  tq = t if t >= TILE_Q and t % ALIGN == 0 else tp   # rows of q / out (Geometry.t_rows): TMA tiles
                                                    # rows by 8 and reads at most a tile past them
  g = Geometry(b=b, t_padded=tp, t_rows=tq, h=h, kv_heads=kh, d=d, s_valid=s, s_padded=sp, block_k=block_k,
               stages=stages, causal=causal, ranges=layout is not None, columns=columns is not None,
               heads_fastest=heads_fastest, scale=scale, dtype=q_BTHD.dtype, lazy_max=lazy_max,
               narrow=narrow and layout is not None and block_k == 128, split=split, profile=profile)
  q = _pad_to(q_BTHD, tq, 1)
  k, v = _pad_to(k_BSKD, sp, 1), _pad_to(v_BSKD, sp, 1)
  unread = jnp.zeros((1, 1, 1, 1), jnp.int32)
  meta = lo = hi = kc = vc = thr = colmap = unread
  if layout is not None:
    meta, lo, hi, thr, colmap, srt = _ranges_inputs(layout, columns, k, t=t, s=s, h=h, block_k=block_k,
                                                    causal=causal, split=split)
    if columns is not None:
      kc, vc = _gather_columns(k, srt, h), _gather_columns(v, srt, h)
  out, lse = call_kernel(g, (q, k, v, meta, lo, hi, kc, vc, thr, colmap))
  return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))


def _check_served(q_BTHD, stages: int, interpret: bool) -> None:
  """ValueError for bad knobs; `dispatch.Unsupported` for calls this kernel does not serve."""
  if not isinstance(stages, int) or isinstance(stages, bool) or stages < 2:
    raise ValueError(f"stages must be an int >= 2, got {stages!r}")
  if interpret:
    raise dispatch.Unsupported("Mosaic GPU kernels have no interpret mode")
  if hopper_device() is None:
    raise dispatch.Unsupported("the Mosaic GPU (wgmma) kernel needs a Hopper GPU (sm_90)")
  if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
    raise dispatch.Unsupported(f"the Mosaic GPU kernel takes bf16 / f16, got {q_BTHD.dtype}")
  if q_BTHD.shape[-1] not in HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {q_BTHD.shape[-1]} not served by the Mosaic GPU kernel "
                               f"(supported: {HEAD_DIMS})")


def flash_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, *, scale: float, causal: bool = True,
                         window=None, q_segment_ids=None, kv_segment_ids=None, kv_offset: int = 0,
                         q_lengths=None, kv_lengths=None, block_k: int = 128, stages: int = 2,
                         heads_fastest: bool = True, interpret: bool = False, block_q=None, num_warps=None,
                         num_stages=None, _poison=None):
  """Dense attention forward on Hopper. Returns (out [B, T, H, D], lse [B, T, H] float32).
  Serves causal self-attention (S == T) and full attention; the other mask features raise
  `dispatch.Unsupported` (the Triton kernel serves them), as do the Triton kernel's knobs
  (block_q, num_warps, num_stages, _poison) when set."""
  dispatch.triton_only(block_q=block_q, num_warps=num_warps, num_stages=num_stages, _poison=_poison)
  check_attention_args(q_BTHD, k_BSKD, v_BSKD, scale=scale, causal=causal, window=window,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       kv_offset=kv_offset, q_lengths=q_lengths, kv_lengths=kv_lengths)
  if block_k not in (64, 128):
    raise ValueError(f"block_k must be 64 or 128 for the Mosaic GPU kernel, got {block_k!r}")
  _check_served(q_BTHD, stages, interpret)
  extras = dict(window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_lengths=q_lengths, kv_lengths=kv_lengths)
  used = [name for name, x in extras.items() if x is not None] + (["kv_offset"] if kv_offset else [])
  if used:
    raise dispatch.Unsupported(f"the Mosaic GPU flash kernel has no {', '.join(used)}")
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  if t == 0 or s == 0:
    raise dispatch.Unsupported(f"empty sequence (T={t}, S={s})")
  if causal and s != t:
    raise dispatch.Unsupported(f"causal with S != T (T={t}, S={s}) needs kv_offset: Triton kernel")
  return _run(q_BTHD, k_BSKD, v_BSKD, None, None, scale=float(scale), causal=bool(causal),
              block_k=block_k, stages=stages, heads_fastest=bool(heads_fastest))


def block_sparse_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, layout, *, scale: float, causal: bool = True,
                                columns=None, interpret: bool = False, stages: int = 2,
                                heads_fastest: bool = True, column_chunk=None, num_warps=None,
                                num_stages=None, _poison=None):
  """Block-sparse / key-range attention forward on Hopper (BlockSparse or KeyRanges layouts of
  block_q x block_k 128x64, 128x128, or 56x64 for split mode, the fastest for vertical-slash sets
  with far slashes; columns as one ascending list per head). Returns (out [B, T, H, D], lse
  [B, T, H] float32). Other layouts and column lists, and the Triton kernel's knobs when set:
  `dispatch.Unsupported`."""
  dispatch.triton_only(column_chunk=column_chunk, num_warps=num_warps, num_stages=num_stages, _poison=_poison)
  check_block_sparse_args(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=scale, causal=causal)
  # a layout's blocks are the layout's, not knobs: one this kernel lacks falls through (Triton)
  if (layout.block_q, layout.block_k) not in LAYOUT_BLOCKS:
    raise dispatch.Unsupported(
        f"the Mosaic GPU kernel takes layouts of block_q x block_k "
        f"{', '.join(f'{q}x{k}' for q, k in LAYOUT_BLOCKS)} ({SPLIT_Q}x64: split mode), "
        f"got {layout.block_q}x{layout.block_k}")
  _check_served(q_BTHD, stages, interpret)
  if columns is not None and not (columns.ascending and columns.index.shape[2] == 1):
    raise dispatch.Unsupported("the Mosaic GPU kernel takes gathered columns as one ascending list "
                               "per head (Columns.ascending, as the vertical-slash builders make); "
                               "the Triton block-sparse kernel serves the others")
  return _run(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=float(scale), causal=bool(causal),
              block_k=layout.block_k, stages=stages, heads_fastest=bool(heads_fastest))


# First in the default order: on a Hopper GPU it is the fastest kernel (benchmarks/results); any
# call it does not serve (no Hopper, interpret mode, masks it lacks) falls through to "triton".
dispatch.register("flash_attention", "mosaic_gpu", flash_attention_mgpu, first=True)
dispatch.register("block_sparse_attention", "mosaic_gpu", block_sparse_attention_mgpu, first=True)
