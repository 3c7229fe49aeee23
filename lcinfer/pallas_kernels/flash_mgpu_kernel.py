"""The Hopper attention kernel body (Pallas, Mosaic GPU lowering): the producer and consumer
warpgroups and the launch. Design, modes and measurements: `flash_mgpu.py`, whose wrappers build
the inputs (`Geometry` static, then q, k, v, meta, lo, hi, kc, vc, thr, colmap)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import mgpu_inline as mi
from lcinfer.pallas_kernels.online_softmax import LN2, LOG2E

HEAD_DIMS = (64, 128)
ROWS_PER_WG = 64   # one wgmma M tile per consumer warpgroup
TILE_Q = 2 * ROWS_PER_WG
ALIGN = 8          # K/V tiles are (8, swizzle) tiled: TMA row offsets must be multiples of 8
NARROW = 64        # narrow steps: a range inside one 8-aligned window of 64 keys, with block_k 128
SPLIT_Q = 56       # split mode: each consumer owns a query block of 56 rows (computes 64) and its
                   # own list; any range of 56 + 7 keys at an 8-aligned start fits one 64-key window


@dataclasses.dataclass(frozen=True)
class Geometry:
  b: int
  t_padded: int
  h: int
  kv_heads: int
  d: int
  s_valid: int
  s_padded: int
  block_k: int
  stages: int
  causal: bool
  ranges: bool         # ranges mode (else dense)
  columns: bool        # ranges mode with gathered columns
  heads_fastest: bool  # grid order (heads, tiles, batch) instead of (tiles, heads, batch)
  scale: float
  dtype: object
  lazy_max: bool = True  # rescale only when a logit passes the running max by LAZY_TAU (mgpu_inline)
  narrow: bool = False   # block_k 128 ranges: a range that fits a 64-key window takes a 64-key step
  split: bool = False    # ranges mode, block_q SPLIT_Q, block_k 64: a list and a K/V ring per consumer

  @property
  def group(self) -> int:
    return self.h // self.kv_heads

  @property
  def rows(self) -> int:
    """Query rows a consumer owns (and writes); it computes ROWS_PER_WG."""
    return SPLIT_Q if self.split else ROWS_PER_WG

  @property
  def n_tiles(self) -> int:
    return self.t_padded // (2 * self.rows)   # split: t_padded = 2 n_tiles SPLIT_Q + 8 (the last
                                              # block's 8 computed rows past its own)

  @property
  def n_halves(self) -> int:
    """Ring slots per stage: split mode gives each consumer its own half."""
    return 2 if self.split else 1


class _Refs(NamedTuple):
  q: object     # [B, Tp, H, D]
  k: object     # [B, Sp, K, D]
  v: object
  meta: object  # [B, H, nq, 9] (ranges mode): ranges, unmasked ranges, column steps, last column,
                # ranges needing the column map, band slots [sa, sb), skipped chunks [from, to);
                # nq: tiles, or in split mode query blocks (two per tile)
  lo: object    # [B, H, nq, M] range starts (ranges mode)
  hi: object
  kc: object    # [B, Cp, H, D] the gathered columns' keys per query head (columns mode)
  vc: object
  thr: object   # [B, H, Tp]: how many of the list's columns query row i attends (columns mode)
  colmap: object  # [B, H, Sp] int32: 1 at the list's columns (columns mode)
  out: object
  lse: object


def _plgpu():
  import jax.experimental.pallas.mosaic_gpu as plgpu  # imported lazily: only Hopper paths need it
  return plgpu


def _stream(g: Geometry, r: _Refs, tile, b, h):
  """(n_list, n_unmasked, n_column_steps) of a tile's (split mode: a query block's) KV stream, int32
  scalars: the list (KV blocks or ranges), of which the last n_unmasked need no mask, then chunks of
  gathered columns."""
  if g.ranges:
    n_cols = r.meta[b, h, tile, 2] if g.columns else jnp.int32(0)
    return r.meta[b, h, tile, 0], r.meta[b, h, tile, 1], n_cols
  nk_all = g.s_padded // g.block_k
  if not g.causal:
    return jnp.int32(nk_all), jnp.int32(g.s_valid // g.block_k), jnp.int32(0)
  q0 = tile * TILE_Q
  end = jnp.minimum(q0 + TILE_Q, g.s_valid)
  n = lax.div(end + g.block_k - 1, jnp.int32(g.block_k))
  n_whole = jnp.minimum(lax.div(q0 + 1, jnp.int32(g.block_k)), jnp.int32(g.s_valid // g.block_k))
  return n, n_whole, jnp.int32(0)


def _entry(g: Geometry, r: _Refs, e, b, h, tile):
  """(lo, hi) of list entry e (a KV block, or a range; e < 0 reads entry 0): keys in [lo, hi) are
  listed. Ranges mode reads them from global memory: the loops fetch the next step's entry a step
  ahead (a loop carry), so that the load's latency is not on the step's critical path."""
  e = jnp.maximum(e, 0)
  if g.ranges:
    return r.lo[b, h, tile, e], r.hi[b, h, tile, e]   # inside one 8-aligned window
  start = e * g.block_k
  return start, jnp.minimum(start + g.block_k, jnp.int32(g.s_valid))


def _window(g: Geometry, lo, width=None):
  """Where the `width`-key (default block_k) load of the entry starting at lo begins."""
  if g.ranges:
    start = jnp.minimum(lo - lax.rem(lo, jnp.int32(ALIGN)), jnp.int32(g.s_padded - (width or g.block_k)))
    return pl.multiple_of(start, ALIGN)
  return pl.multiple_of(lo, g.block_k)   # a KV block: e * block_k (the loop carry forgets that)


def _is_narrow(entry):
  """Does the range fit the 8-aligned 64-key window at its start (a narrow step)?"""
  lo, hi = entry
  return hi <= lo - lax.rem(lo, jnp.int32(ALIGN)) + NARROW


def _column_chunk(jj, skip_from, skip_to):
  """The list chunk of column step jj: chunks [skip_from, skip_to) (band columns) are skipped."""
  return jnp.where(jj < skip_from, jj, jj + skip_to - skip_from)


def _split_steps(g: Geometry, r: _Refs, tile, b, h):
  """Split mode: the steps both consumers of the tile take (the longer of their two streams; the
  other idles through the rest, keeping the ping-pong)."""
  n = [sum(_stream(g, r, 2 * tile + w, b, h)[::2]) for w in (0, 1)]
  return jnp.maximum(n[0], n[1])


def _consumer(g: Geometry, r: _Refs, scoped, wg, tile, b, h):
  plgpu = _plgpu()
  (qo_smem2, k_smem, v_smem, lse_smem2, flags2), (k_full, v_full, q_bar), (k_free, v_free), sched = scoped
  bk, d = g.block_k, g.d
  qo_smem, lse_smem, flags = qo_smem2.at[wg], lse_smem2.at[wg], flags2.at[wg]
  if g.split:  # the consumer's own query block, list and half of each ring slot
    blk = 2 * tile + wg
    q_base = pl.multiple_of(blk * SPLIT_Q, ALIGN)
  else:
    blk = tile
    q_base = tile * TILE_Q + wg * ROWS_PER_WG
  n_list, n_whole, n_cols = _stream(g, r, blk, b, h)
  plgpu.set_max_registers(232, action="increase")

  def sync():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  plgpu.copy_gmem_to_smem(r.q.at[b, pl.ds(q_base, ROWS_PER_WG), h], qo_smem, q_bar.at[wg])
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
  if g.columns:
    thr = plgpu.load(r.thr.at[b, h, pl.ds(q_base, ROWS_PER_WG)], layout=row_layout, optimized=False)
    thr_first = r.thr[b, h, q_base]   # rows ascend: the fewest columns of the warpgroup's rows
    last_col = r.meta[b, h, blk, 3]
    band_from, band_to = r.meta[b, h, blk, 5], r.meta[b, h, blk, 6]
    skip_from, skip_to = r.meta[b, h, blk, 7], r.meta[b, h, blk, 8]

  def key_bias(j, kind, entry, w):
    """Step j's per-key part of the mask as a [bk] bias (0 or -inf; None: no mask) and the
    first key (or list slot) of its window. Computed before the step waits for its K tile, so
    that the loads it needs (the column map) are not on the critical path."""
    if kind == "whole":
      return None, None
    if kind == "columns":  # slots of the sorted list minus the band's
      c0 = _column_chunk(j - n_list, skip_from, skip_to) * bk
      slot = c0 + col_iota(w)
      return bias((slot < band_from) | (slot >= band_to)), c0
    lo, hi = entry
    start = _window(g, lo, w)
    k_col = start + col_iota(w)
    keep = (k_col >= lo) & (k_col < hi)
    if kind == "colmasked":  # a key of the range that is also one of the tile's columns is counted there
      is_col = plgpu.load(r.colmap.at[b, h, pl.ds(start, w)], layout=col_layout, optimized=False)
      keep = keep & ((is_col == 0) | (k_col > last_col))
    return bias(keep), start

  def masked(kind, s, col_bias, start, w):
    """s with the keys of the step that it does not count at -inf: the per-key bias added, the
    per-row part only on the steps that need it (lax.cond, uniform)."""
    if col_bias is None:
      return s
    s = s + by_col(col_bias)
    if kind == "columns":  # row i attends the first thr[i] slots
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

  def body(j, kind, entry, w, carry):
    """One step of w keys (block_k, or NARROW for a narrow step) of the stream."""
    acc, m, l = carry
    col_bias, first = key_bias(j, kind, entry, w)
    slot = lax.rem(j, jnp.int32(g.stages)) * g.n_halves + (wg if g.split else 0)
    k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
    if w != bk:
      k_tile, v_tile = k_smem.at[slot, pl.ds(0, w)], v_smem.at[slot, pl.ds(0, w)]
    plgpu.barrier_wait(k_full.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, qo_smem, k_tile.transpose((1, 0)))
      sync()
      return acc_ref[...]
    s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WG, w), jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])
    s = masked(kind, s, col_bias, first, w)
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
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(v_full.at[slot])
    plgpu.barrier_wait(sched)

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_tile)
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m, l

  def step(j, carry, kind):
    acc, m, l, entry = carry
    if kind in ("whole", "columns"):  # the loops run colmasked, masked, whole, columns: no later
      next_entry = entry              # step reads its entry, so no load on these hot loops
    else:  # the next step's entry, a step ahead
      next_entry = _entry(g, r, n_list - 2 - j, b, h, blk)
    if g.narrow and kind in ("masked", "colmasked"):  # both warpgroups take the same branch
      acc, m, l = lax.cond(_is_narrow(entry), functools.partial(body, j, kind, entry, NARROW),
                           functools.partial(body, j, kind, entry, bk), (acc, m, l))
    else:
      acc, m, l = body(j, kind, entry, bk, (acc, m, l))
    return acc, m, l, next_entry

  pl.when(wg == 1)(sync)
  n_masked = n_list - n_whole  # the list runs backwards: its masked entries first
  carry = (acc, m, l, _entry(g, r, n_list - 1, b, h, blk))
  n_colmasked = jnp.int32(0)
  if g.columns:  # those needing the column map come first
    n_colmasked = r.meta[b, h, blk, 4]
    carry = lax.fori_loop(0, n_colmasked, functools.partial(step, kind="colmasked"), carry)
  carry = lax.fori_loop(n_colmasked, n_masked, functools.partial(step, kind="masked"), carry)
  carry = lax.fori_loop(n_masked, n_list, functools.partial(step, kind="whole"), carry)
  if g.columns:
    carry = lax.fori_loop(n_list, n_list + n_cols, functools.partial(step, kind="columns"), carry)
  if g.split:  # the other consumer's stream is longer: idle steps keep the ping-pong's barrier count
    @pl.loop(n_list + n_cols, _split_steps(g, r, tile, b, h))
    def _(j):
      sync()
      sync()
  acc, m, l, _ = carry
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
  plgpu.wait_smem_to_gmem(0)


def _producer(g: Geometry, r: _Refs, scoped, tile, b, h):
  plgpu = _plgpu()
  (_, k_smem, v_smem, _, _), (k_full, v_full, _), (k_free, v_free), _ = scoped
  plgpu.set_max_registers(40, action="decrease")
  kvh = lax.div(h, jnp.int32(g.group))

  def load(j, half, src, rows, w=g.block_k):
    slot = lax.rem(j, jnp.int32(g.stages)) * g.n_halves + half
    for x, smem, full, free in ((src[0], k_smem, k_full, k_free), (src[1], v_smem, v_full, v_free)):
      @pl.when(j >= g.stages)
      def _():
        plgpu.barrier_wait(free.at[slot])
      dst = smem.at[slot] if w == g.block_k else smem.at[slot, pl.ds(0, w)]
      plgpu.copy_gmem_to_smem(x.at[rows], dst, full.at[slot])

  def column_load(j, half, blk, n_list):
    skip_from, skip_to = r.meta[b, h, blk, 7], r.meta[b, h, blk, 8]
    c0 = pl.multiple_of(_column_chunk(j - n_list, skip_from, skip_to) * g.block_k, g.block_k)
    load(j, half, (r.kc, r.vc), (b, pl.ds(c0, g.block_k), h))

  if g.split:  # two streams, one per consumer's half of the slots, a step of each in turn
    streams = [(2 * tile + w,) + _stream(g, r, 2 * tile + w, b, h) for w in (0, 1)]

    @pl.loop(0, _split_steps(g, r, tile, b, h))
    def _(j):
      for half, (blk, n_list, _, n_cols) in enumerate(streams):
        @pl.when(j < n_list)
        def _():
          lo = _entry(g, r, n_list - 1 - j, b, h, blk)[0]
          load(j, half, (r.k, r.v), (b, pl.ds(_window(g, lo), g.block_k), kvh))
        if g.columns:
          pl.when((j >= n_list) & (j < n_list + n_cols))(lambda: column_load(j, half, blk, n_list))
    return

  n_list, _, n_cols = _stream(g, r, tile, b, h)

  def list_step(j, entry):
    if not g.narrow:
      load(j, 0, (r.k, r.v), (b, pl.ds(_window(g, entry[0]), g.block_k), kvh))
    else:
      for narrow, w in ((True, NARROW), (False, g.block_k)):
        @pl.when(_is_narrow(entry) == narrow)
        def _():
          load(j, 0, (r.k, r.v), (b, pl.ds(_window(g, entry[0], w), w), kvh), w)
    return _entry(g, r, n_list - 2 - j, b, h, tile)   # a step ahead
  lax.fori_loop(0, n_list, list_step, _entry(g, r, n_list - 1, b, h, tile))

  if g.columns:
    pl.loop(n_list, n_list + n_cols)(lambda j: column_load(j, 0, tile, n_list))


def call_kernel(g: Geometry, args, interpret=None):
  plgpu = _plgpu()
  d, bk = g.d, g.block_k

  def body(*refs):
    r = _Refs(*refs)
    if g.heads_fastest:
      h, t_idx = lax.axis_index("head"), lax.axis_index("tile")
    else:
      t_idx, h = lax.axis_index("tile"), lax.axis_index("head")
    tile = jnp.int32(g.n_tiles - 1) - t_idx  # heaviest (causal) tiles first
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")

    def scoped(*scoped):
      @pl.when(wg < 2)
      def _():
        _consumer(g, r, scoped, wg, tile, b, h)

      @pl.when(wg == 2)
      def _():
        _producer(g, r, scoped, tile, b, h)

    itemsize = jnp.dtype(g.dtype).itemsize
    swz = min(128, d * itemsize)
    transforms = (plgpu.TilingTransform((8, swz // itemsize)), plgpu.SwizzleTransform(swz))
    slots = g.stages * g.n_halves   # split mode: slot s of stage i is s = 2 i + consumer
    pl.run_scoped(
        scoped,
        (plgpu.SMEM((2, ROWS_PER_WG, d), g.dtype, transforms=transforms),
         plgpu.SMEM((slots, bk, d), g.dtype, transforms=transforms),
         plgpu.SMEM((slots, bk, d), g.dtype, transforms=transforms),
         plgpu.SMEM((2, ROWS_PER_WG), jnp.float32),
         plgpu.SMEM((2, 2, 4), jnp.int32)),   # per consumer: two sets of per-warp votes (lazy max)
        (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
         plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=3 - g.n_halves, num_barriers=slots),) * 2,   # freed by its readers
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  out_type = (jax.ShapeDtypeStruct((g.b, g.t_padded, g.h, d), g.dtype),
              jax.ShapeDtypeStruct((g.b, g.h, g.t_padded), jnp.float32))
  grid, names = (g.n_tiles, g.h, g.b), ("tile", "head", "batch")
  if g.heads_fastest:  # the CTAs in flight: a few tiles of every head
    grid, names = (g.h, g.n_tiles, g.b), ("head", "tile", "batch")
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=names, num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name="lcinfer_flash_mgpu",
      interpret=interpret)(*args)
