"""The Hopper attention kernel (Pallas, Mosaic GPU lowering): its geometry, the KV stream of a tile,
the producer warpgroup and the launch; the consumers are in `flash_mgpu_consumer.py`. Design, modes
and measurements: `flash_mgpu.py`, whose wrappers build the inputs (`Geometry` static, then q, k, v,
and from `flash_mgpu_inputs.py` meta, lo, hi, kc, vc, thr, colmap)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


HEAD_DIMS = (64, 128)
ROWS_PER_WG = 64   # one wgmma M tile per consumer warpgroup
TILE_Q = 2 * ROWS_PER_WG
ALIGN = 8          # K/V tiles are (8, swizzle) tiled: TMA row offsets must be multiples of 8
NARROW = 64        # narrow steps: a range inside one 8-aligned window of 64 keys, with block_k 128
SPLIT_Q = 56       # split mode: each consumer owns a query block of 56 rows (computes 64) and its
                   # own list; any range of 56 + 7 keys at an 8-aligned start fits one 64-key window
SHARED = 128       # split mode: the band's windows, shared by both consumers (a whole ring slot)

# The fields of a meta row ([B, H, nq, N_META] int32, one row per tile, or per query block in split
# mode): list length, unmasked entries (the last ones), column steps, last column, entries needing
# the column map (the first ones), band slots [sa, sb) of the column list, skipped column chunks
# [from, to), the band [ea, eb), and (split mode, the tile's) first shared window and their count,
# then its shared column steps (SHARED-slot chunks of the list that both consumers take) and their
# skipped chunks [from, to).
(M_COUNT, M_WHOLE, M_NCOLS, M_LAST, M_COLMASKED, M_SA, M_SB, M_SKIP_FROM, M_SKIP_TO, M_EA, M_EB,
 M_SHARED_AT, M_SHARED_N, M_SCOL_N, M_SCOL_FROM, M_SCOL_TO) = range(16)
N_META = 16


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
  split: bool = False    # ranges mode, block_q SPLIT_Q, block_k 64: shared band windows, then a list
                         # per consumer in its half of the slots
  t_rows: int = 0        # rows of q and out (0: t_padded). The wrapper pads q only when it is
                         # shorter than a tile or not a multiple of 8 rows: else TMA zero-fills the
                         # rows a tile reads past the end and drops the rows it writes past it (no
                         # copy of q or out per call)
  profile: tuple = ()    # (regions a warpgroup, directory): Mosaic GPU's in-kernel profiler records
                         # the `region`s below (clock cycles) and writes a trace there (probes only)
  interpret: object = False  # True or a plgpu.InterpretGPUParams: Mosaic GPU's interpret mode (CPU
                             # tests); the pieces it cannot run take stand-ins (`interpret_params`)

  @property
  def rows_q(self) -> int:
    return self.t_rows or self.t_padded

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
  def slot_rows(self) -> int:
    """Keys of a ring slot: split mode's hold a shared window or a 64-key window per consumer."""
    return SHARED if self.split else self.block_k


class _Refs(NamedTuple):
  q: object     # [B, T, H, D] (Geometry.rows_q rows)
  k: object     # [B, Sp, K, D]
  v: object
  meta: object  # [B, H, nq, N_META] (ranges mode; the M_* fields); nq: tiles, or in split mode
                # query blocks (two per tile)
  lo: object    # [B, H, nq, M] range starts (ranges mode)
  hi: object
  kc: object    # [B, Cp, H, D] the gathered columns' keys per query head (columns mode)
  vc: object
  thr: object   # [B, H, Tp]: how many of the list's columns query row i attends (columns mode)
  colmap: object  # [B, H, Sp] int32: 1 at the list's columns (columns mode)
  out: object
  lse: object


def region(name: str):
  """A named region of the kernel: timed by Mosaic GPU's profiler when Geometry.profile is set (one
  begin / end pair of clock reads a warpgroup), nothing otherwise. Regions do not nest: the probe
  (`benchmarks/probes/kprof.py`) pairs each "k:" begin with the next event."""
  return jax.named_scope("k:" + name)


def _plgpu():
  import jax.experimental.pallas.mosaic_gpu as plgpu  # imported lazily: only Hopper paths need it
  return plgpu


def _stream(g: Geometry, r: _Refs, tile, b, h):
  """(n_list, n_unmasked, n_column_steps) of a tile's (split mode: a query block's) KV stream, int32
  scalars: the list (KV blocks or ranges), of which the last n_unmasked need no mask, then chunks of
  gathered columns."""
  if g.ranges:
    n_cols = r.meta[b, h, tile, M_NCOLS] if g.columns else jnp.int32(0)
    return r.meta[b, h, tile, M_COUNT], r.meta[b, h, tile, M_WHOLE], n_cols
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


class SplitSteps(NamedTuple):
  """Split mode, a tile's steps: both consumers take the shared band windows [0, n_shared), then the
  shared column chunks [n_shared, first_own), then as many own steps as the longer of their two
  lists (plus own column chunks): the other idles through the rest, keeping the ping-pong and the
  slots' barrier phases."""
  at: object        # the first shared band window's start
  n_shared: object
  first_own: object  # n_shared + the shared column steps
  n_own: object
  col_from: object  # the shared column chunks skipped (both blocks' band columns): [from, to)
  col_to: object


def split_steps(g: Geometry, r: _Refs, tile, b, h) -> SplitSteps:
  n = [sum(_stream(g, r, 2 * tile + w, b, h)[::2]) for w in (0, 1)]
  m = lambda f: r.meta[b, h, 2 * tile, f]   # noqa: E731 (the tile's fields, on its first block's row)
  n_shared = m(M_SHARED_N)
  n_scol, col_from, col_to = (m(M_SCOL_N), m(M_SCOL_FROM), m(M_SCOL_TO)) if g.columns else (jnp.int32(0),) * 3
  return SplitSteps(m(M_SHARED_AT), n_shared, n_shared + n_scol, jnp.maximum(n[0], n[1]), col_from, col_to)


def shared_column_rows(j, st: SplitSteps):
  """Split mode, shared column step j: the first slot of its SHARED-slot chunk of the list."""
  return pl.multiple_of(_column_chunk(j - st.n_shared, st.col_from, st.col_to) * SHARED, SHARED)


def shared_window(g: Geometry, at, n_shared, j):
  """Split mode, shared step j (the diagonal's first): (load start, [lo, lo + SHARED) the keys it
  stands for). Nominal windows tile [at, at + SHARED n_shared); the load of the last one is moved
  back inside the padded keys (its keys past them do not exist)."""
  lo = at + SHARED * (n_shared - 1 - j)
  return pl.multiple_of(jnp.minimum(lo, jnp.int32(g.s_padded - SHARED)), ALIGN), lo


def _producer(g: Geometry, r: _Refs, scoped, tile, b, h):
  plgpu = _plgpu()
  (_, k_smem, v_smem, *_), (k_full, v_full, _), (k_free, v_free), _ = scoped
  plgpu.set_max_registers(40, action="decrease")
  kvh = lax.div(h, jnp.int32(g.group))

  def load(j, src, rows, w=g.block_k):
    slot = lax.rem(j, jnp.int32(g.stages))
    for x, smem, full, free in ((src[0], k_smem, k_full, k_free), (src[1], v_smem, v_full, v_free)):
      @pl.when(j >= g.stages)
      def _():
        with region("p.wait_free"):
          plgpu.barrier_wait(free.at[slot])
      dst = smem.at[slot] if w == g.block_k else smem.at[slot, pl.ds(0, w)]
      plgpu.copy_gmem_to_smem(x.at[rows], dst, full.at[slot])

  def column_rows(j, blk, n_list):
    skip_from, skip_to = r.meta[b, h, blk, M_SKIP_FROM], r.meta[b, h, blk, M_SKIP_TO]
    return pl.multiple_of(_column_chunk(j - n_list, skip_from, skip_to) * g.block_k, g.block_k)

  if g.split:
    _split_producer(g, r, scoped, tile, b, h, kvh, column_rows)
    return
  n_list, _, n_cols = _stream(g, r, tile, b, h)

  def list_step(j, entry):
    if not g.narrow:
      load(j, (r.k, r.v), (b, pl.ds(_window(g, entry[0]), g.block_k), kvh))
    else:
      for narrow, w in ((True, NARROW), (False, g.block_k)):
        @pl.when(_is_narrow(entry) == narrow)
        def _():
          load(j, (r.k, r.v), (b, pl.ds(_window(g, entry[0], w), w), kvh), w)
    return _entry(g, r, n_list - 2 - j, b, h, tile)   # a step ahead
  lax.fori_loop(0, n_list, list_step, _entry(g, r, n_list - 1, b, h, tile))

  if g.columns:
    pl.loop(n_list, n_list + n_cols)(lambda j: load(j, (r.kc, r.vc), (b, pl.ds(column_rows(j, tile, n_list),
                                                                              g.block_k), h)))
  _drain_if_interpreted(g, n_list + n_cols, (k_free, v_free))


def _drain_if_interpreted(g: Geometry, n_steps, frees):
  """Interpret mode: wait for the slots' last `stages` releases, which the producer never reads on a
  GPU (the CTA ends); the interpreter requires every phase of a barrier a thread waits on to be
  seen before the barrier is freed."""
  if not g.interpret:
    return
  plgpu = _plgpu()

  @pl.loop(jnp.maximum(n_steps - g.stages, 0), n_steps)
  def _(j):
    for free in frees:
      plgpu.barrier_wait(free.at[lax.rem(j, jnp.int32(g.stages))])


def _split_producer(g: Geometry, r: _Refs, scoped, tile, b, h, kvh, column_rows):
  """Split mode: each step fills one slot, by one SHARED-key window (a band step) or by one 64-key
  window per consumer half (its range, or its column chunk). The slot's full barrier takes two
  arrivals a phase: two copies, or a copy and a bare arrival (a shared window, a half with nothing)."""
  plgpu = _plgpu()
  (_, k_smem, v_smem, *_), (k_full, v_full, _), (k_free, v_free), _ = scoped
  st = split_steps(g, r, tile, b, h)
  halves = [(w, 2 * tile + w) + _stream(g, r, 2 * tile + w, b, h) for w in (0, 1)]
  ring = ((r.k, r.kc, k_smem, k_full, k_free), (r.v, r.vc, v_smem, v_full, v_free))

  @pl.loop(0, st.first_own + st.n_own)
  def _(j):
    slot = lax.rem(j, jnp.int32(g.stages))
    jl = j - st.first_own
    own = j >= st.first_own
    for x, xc, smem, full, free in ring:
      @pl.when(j >= g.stages)
      def _():
        with region("p.wait_free"):
          plgpu.barrier_wait(free.at[slot])

      @pl.when(j < st.n_shared)
      def _():
        start, _ = shared_window(g, st.at, st.n_shared, j)
        plgpu.copy_gmem_to_smem(x.at[b, pl.ds(start, SHARED), kvh], smem.at[slot], full.at[slot])
        plgpu.barrier_arrive(full.at[slot])

      if g.columns:
        @pl.when((j >= st.n_shared) & ~own)
        def _():
          rows = pl.ds(shared_column_rows(j, st), SHARED)
          plgpu.copy_gmem_to_smem(xc.at[b, rows, h], smem.at[slot], full.at[slot])
          plgpu.barrier_arrive(full.at[slot])

      for w, blk, n_list, _, n_cols in halves:
        dst = smem.at[slot, pl.ds(w * g.block_k, g.block_k)]
        in_list, in_cols = own & (jl < n_list), (jl >= n_list) & (jl < n_list + n_cols)

        @pl.when(in_list)
        def _():
          lo = _entry(g, r, n_list - 1 - jl, b, h, blk)[0]
          plgpu.copy_gmem_to_smem(x.at[b, pl.ds(_window(g, lo), g.block_k), kvh], dst, full.at[slot])
        if g.columns:
          pl.when(in_cols)(lambda: plgpu.copy_gmem_to_smem(
              xc.at[b, pl.ds(column_rows(jl, blk, n_list), g.block_k), h], dst, full.at[slot]))
        pl.when(own & ~in_list & ~in_cols)(lambda: plgpu.barrier_arrive(full.at[slot]))
  _drain_if_interpreted(g, st.first_own + st.n_own, (k_free, v_free))


def interpret_params(g: Geometry):
  """Mosaic GPU's interpret mode (one Python thread a warpgroup, shared memory and barriers simulated,
  unwritten outputs NaN, out-of-bounds reads raised, every barrier phase checked as observed) for
  Geometry.interpret, else None. Three pieces of the GPU path take stand-ins there. In the consumer,
  the lazy maximum's warp vote (inline PTX) is a jnp.any, and P V reads P from shared memory into a
  fresh accumulator added to O (the interpreter's wgmma takes no register operand and no accumulator
  initialized from registers). The producer waits for the slots' last releases before it ends
  (`_drain_if_interpreted`). Everything else (masks, lists, windows, the ring's barrier protocol) is
  the code that runs on the GPU."""
  if not g.interpret:
    return None
  return _plgpu().InterpretGPUParams() if g.interpret is True else g.interpret


def _profile_params(g: Geometry) -> dict:
  if not g.profile:
    return {}
  space, directory = g.profile
  return dict(profile_space=space, profile_dir=directory, profile_bounds_check=True)


def call_kernel(g: Geometry, args):
  plgpu = _plgpu()
  d = g.d

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
        from lcinfer.pallas_kernels.flash_mgpu_consumer import consumer  # it imports this module
        consumer(g, r, scoped, wg, tile, b, h)

      @pl.when(wg == 2)
      def _():
        _producer(g, r, scoped, tile, b, h)

    itemsize = jnp.dtype(g.dtype).itemsize
    swz = min(128, d * itemsize)
    transforms = (plgpu.TilingTransform((8, swz // itemsize)), plgpu.SwizzleTransform(swz))
    fills = 2 if g.split else 1     # arrivals that fill a slot (split mode: see _split_producer)
    pl.run_scoped(
        scoped,
        (plgpu.SMEM((2, ROWS_PER_WG, d), g.dtype, transforms=transforms),
         plgpu.SMEM((g.stages, g.slot_rows, d), g.dtype, transforms=transforms),
         plgpu.SMEM((g.stages, g.slot_rows, d), g.dtype, transforms=transforms),
         plgpu.SMEM((2, ROWS_PER_WG), jnp.float32),
         plgpu.SMEM((2, 2, 4), jnp.int32))   # per consumer: two sets of per-warp votes (lazy max)
        + ((plgpu.SMEM((2, ROWS_PER_WG, g.slot_rows), g.dtype),) if g.interpret else ()),   # P, interpret mode
        (plgpu.Barrier(num_arrivals=fills, num_barriers=g.stages),
         plgpu.Barrier(num_arrivals=fills, num_barriers=g.stages), plgpu.Barrier(num_barriers=2)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=g.stages),) * 2,   # freed by both consumers
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  out_type = (jax.ShapeDtypeStruct((g.b, g.rows_q, g.h, d), g.dtype),
              jax.ShapeDtypeStruct((g.b, g.h, g.t_padded), jnp.float32))  # small: TMA wants 8 | rows
  grid, names = (g.n_tiles, g.h, g.b), ("tile", "head", "batch")
  if g.heads_fastest:  # the CTAs in flight: a few tiles of every head
    grid, names = (g.h, g.n_tiles, g.b), ("head", "tile", "batch")
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=names, num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, **_profile_params(g)), kernel_name="lcinfer_flash_mgpu",
      interpret=interpret_params(g))(*args)
