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

from lcinfer.pallas_kernels.online_softmax import LN2, LOG2E

HEAD_DIMS = (64, 128)
ROWS_PER_WG = 64   # one wgmma M tile per consumer warpgroup
TILE_Q = 2 * ROWS_PER_WG
ALIGN = 8          # K/V tiles are (8, swizzle) tiled: TMA row offsets must be multiples of 8


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

  @property
  def group(self) -> int:
    return self.h // self.kv_heads

  @property
  def n_tiles(self) -> int:
    return self.t_padded // TILE_Q


class _Refs(NamedTuple):
  q: object     # [B, Tp, H, D]
  k: object     # [B, Sp, K, D]
  v: object
  meta: object  # [B, H, nq, 4]: ranges, unmasked ranges, column chunks, last column (ranges mode)
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
  """(n_list, n_unmasked, n_column_chunks) of a tile's KV stream, int32 scalars: the list (KV blocks
  or ranges), of which the last n_unmasked need no mask, then chunks of gathered columns."""
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


def _entry_keys(g: Geometry, r: _Refs, e, b, h, tile):
  """(start, lo, hi) of list entry e (a KV block, or a range): the load starts at `start`; keys in
  [lo, hi) are listed."""
  if g.ranges:
    lo, hi = r.lo[b, h, tile, e], r.hi[b, h, tile, e]   # inside one 8-aligned window
    start = jnp.minimum(lo - lax.rem(lo, jnp.int32(ALIGN)), jnp.int32(g.s_padded - g.block_k))
    return pl.multiple_of(start, ALIGN), lo, hi
  start = e * g.block_k
  return start, start, jnp.minimum(start + g.block_k, jnp.int32(g.s_valid))


def _consumer(g: Geometry, r: _Refs, scoped, wg, tile, b, h):
  plgpu = _plgpu()
  (qo_smem2, k_smem, v_smem, lse_smem2), (k_full, v_full, q_bar), (k_free, v_free), sched = scoped
  bk, d = g.block_k, g.d
  qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
  q_base = tile * TILE_Q + wg * ROWS_PER_WG
  n_list, n_whole, n_cols = _stream(g, r, tile, b, h)
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
  shape = (ROWS_PER_WG, bk)
  iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, shape, layout=wgmma_layout)
  if g.columns:
    thr = plgpu.load(r.thr.at[b, h, pl.ds(q_base, ROWS_PER_WG)], layout=row_layout, optimized=False)
    last_col = r.meta[b, h, tile, 3]

  def keep_of(j, kind):
    """The mask of step j (None: none needed)."""
    if kind == "whole":
      return None
    if kind == "columns":  # slots of the sorted list: row i attends the first thr[i]
      slot = (j - n_list) * bk + iota(1)
      return slot < lax.broadcast_in_dim(thr, shape, [0])
    start, lo, hi = _entry_keys(g, r, n_list - 1 - j, b, h, tile)
    k_pos = start + iota(1)
    keep = (k_pos >= lo) & (k_pos < hi)
    if g.causal:
      keep = keep & (k_pos <= q_base + iota(0))
    if g.columns:  # a key of the range that is also one of the tile's columns is counted there
      is_col = plgpu.load(r.colmap.at[b, h, pl.ds(start, bk)], layout=col_layout, optimized=False)
      keep = keep & ((lax.broadcast_in_dim(is_col, shape, [1]) == 0) | (k_pos > last_col))
    return keep

  def step(j, carry, kind):
    acc, m, l = carry
    slot = lax.rem(j, jnp.int32(g.stages))
    plgpu.barrier_wait(k_full.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
      sync()
      return acc_ref[...]
    s = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])
    keep = keep_of(j, kind)
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1) * c)
    if keep is not None or g.ranges:  # a row may have seen nothing yet: keep exponents finite
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_use = m_new
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, shape, [0]))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    l = l * alpha + p.sum(axis=1)
    p16 = p.astype(g.dtype)
    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(v_full.at[slot])
    plgpu.barrier_wait(sched)

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m_new, l

  pl.when(wg == 1)(sync)
  n_masked = n_list - n_whole  # the list runs backwards: its masked entries first
  carry = lax.fori_loop(0, n_masked, functools.partial(step, kind="masked"), (acc, m, l))
  carry = lax.fori_loop(n_masked, n_list, functools.partial(step, kind="whole"), carry)
  if g.columns:
    carry = lax.fori_loop(n_list, n_list + n_cols, functools.partial(step, kind="columns"), carry)
  acc, m, l = carry
  pl.when(wg == 0)(sync)

  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
  qo_smem[...] = acc.astype(g.dtype)
  lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(qo_smem, r.out.at[b, pl.ds(q_base, ROWS_PER_WG), h])
  plgpu.copy_smem_to_gmem(lse_smem, r.lse.at[b, h, pl.ds(q_base, ROWS_PER_WG)])
  plgpu.wait_smem_to_gmem(0)


def _producer(g: Geometry, r: _Refs, scoped, tile, b, h):
  plgpu = _plgpu()
  (_, k_smem, v_smem, _), (k_full, v_full, _), (k_free, v_free), _ = scoped
  plgpu.set_max_registers(40, action="decrease")
  kvh = lax.div(h, jnp.int32(g.group))
  n_list, _, n_cols = _stream(g, r, tile, b, h)

  def load(j, src, rows):
    slot = lax.rem(j, jnp.int32(g.stages))
    for x, smem, full, free in ((src[0], k_smem, k_full, k_free), (src[1], v_smem, v_full, v_free)):
      @pl.when(j >= g.stages)
      def _():
        plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(x.at[rows], smem.at[slot], full.at[slot])

  @pl.loop(0, n_list)
  def _(j):
    start, _, _ = _entry_keys(g, r, n_list - 1 - j, b, h, tile)
    load(j, (r.k, r.v), (b, pl.ds(start, g.block_k), kvh))

  if g.columns:
    @pl.loop(n_list, n_list + n_cols)
    def _(j):
      c0 = pl.multiple_of((j - n_list) * g.block_k, g.block_k)
      load(j, (r.kc, r.vc), (b, pl.ds(c0, g.block_k), h))


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
    pl.run_scoped(
        scoped,
        (plgpu.SMEM((2, ROWS_PER_WG, d), g.dtype, transforms=transforms),
         plgpu.SMEM((g.stages, bk, d), g.dtype, transforms=transforms),
         plgpu.SMEM((g.stages, bk, d), g.dtype, transforms=transforms),
         plgpu.SMEM((2, ROWS_PER_WG), jnp.float32)),
        (plgpu.Barrier(num_barriers=g.stages), plgpu.Barrier(num_barriers=g.stages),
         plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=g.stages),) * 2,
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
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)(*args)
