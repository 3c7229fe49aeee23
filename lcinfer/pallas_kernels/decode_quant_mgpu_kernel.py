"""The Hopper int4 KIVI flash-decoding kernel (Pallas, Mosaic GPU lowering): its geometry, body and
launch. Design, contract and measurements: `decode_quant_mgpu.py`, whose wrapper prepares the
queries, builds the `Geometry` and combines the splits."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import mgpu_inline as mi
from lcinfer.pallas_kernels.online_softmax import LN2, LOG2E

HEAD_DIM = 128
CONSUMER_REGISTERS = {1: 232, 2: 232, 3: 152}   # per consumer thread, beside a 40-register producer


@dataclasses.dataclass(frozen=True)
class Geometry:
  b: int
  kh: int
  rows: int            # G * T real query rows per kv head
  c: int
  block_k: int
  splits: int
  blocks_per_split: int
  stages: int
  group: int           # the keys' token group
  scale: float
  window: int | None
  lazy_max: bool = True  # keep the running max unless a logit exceeds it by LAZY_TAU (module docstring)
  sub: int = 1           # 64-key blocks per TMA stage (2: half the copies and their barriers per key)
  async_pv: bool = False  # P V left in flight under the next block's key unpacking (unmeasured)
  q_direct: bool = False  # T = 1: queries straight from [B, 1, H, D], permuted in the kernel (unmeasured)
  consumers: int = 0      # > 0: that many consumer warpgroups (a split each) + a TMA producer (unmeasured)

  @property
  def n_blocks(self) -> int:
    return self.c // self.block_k

  @property
  def launched_splits(self) -> int:  # consumers > 0: whole CTAs of `consumers` splits (the extra ones empty)
    return -(-self.splits // self.consumers) * self.consumers if self.consumers else self.splits

  @property
  def n_q(self) -> int:  # the wgmma N side: query rows padded to 8, 16, 32 or 64
    return next(n for n in (8, 16, 32, 64) if n >= self.rows)

  @property
  def stage_keys(self) -> int:
    return self.sub * self.block_k

  @property
  def scale_rows(self) -> int:  # key-scale rows per stage: 1, or one per block (group = block_k)
    return 1 if self.group % self.stage_keys == 0 else self.sub

  @property
  def p_transposed(self) -> bool:  # N = 8: P is kept as [n_q, bk] (16-byte rows cannot be swizzled)
    return self.n_q == 8

  @property
  def p_swizzle(self) -> int:  # the P tile's rows
    return 2 * self.block_k if self.p_transposed else 2 * self.n_q


class _Views(NamedTuple):
  """One consumer's shared memory: its queries, TMA ring, P, O^T / lse staging and vote flags, and
  its barriers (`full(slot)`, `q_bar`); q_raw: the raw query rows (q_direct) or None."""
  q_smem: Any
  kc: Any
  vc: Any
  ks: Any
  kz: Any
  vs: Any
  vz: Any
  pos: Any
  p: Any
  o: Any
  lse: Any
  flags: Any
  full: Callable
  q_bar: Any
  q_raw: Any


def _n_stages(g: Geometry, split):
  """TMA stages of a split (0 past the cache: a consumer of the last CTA may have no split)."""
  n = jnp.clip(g.n_blocks - split * g.blocks_per_split, 0, g.blocks_per_split)
  return lax.div(n, jnp.int32(g.sub))


def _issue(g: Geometry, gm, v: _Views, split, b, h, j):
  """Stage j of `split` (blocks first + sub j ..) into v's ring slot j % stages: 7 copies."""
  plgpu = mi.plgpu()
  _, _, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, _, _ = gm
  sk, first = g.stage_keys, split * g.blocks_per_split
  slot = lax.rem(j, jnp.int32(g.stages))
  start = pl.multiple_of(first * g.block_k + j * sk, sk)
  keys = pl.ds(start, sk)
  grp = lax.div(start, jnp.int32(g.group))
  rows = g.scale_rows
  for src, dst in ((kc_ref.at[b, h, keys], v.kc), (vc_ref.at[b, h, keys], v.vc),
                   (ks_ref.at[b, h, pl.ds(grp, rows)], v.ks), (kz_ref.at[b, h, pl.ds(grp, rows)], v.kz),
                   (vs_ref.at[b, h, keys], v.vs), (vz_ref.at[b, h, keys], v.vz), (pos_ref.at[b, h, keys], v.pos)):
    plgpu.copy_gmem_to_smem(src, dst.at[slot], v.full(slot))


def _body(g: Geometry, *refs):
  """One warpgroup per CTA (g.consumers == 0): it issues its own TMA stages and computes."""
  gm, sc = refs[:11], refs[11:]
  q_smem, kc, vc, ks, kz, vs, vz, pos, p, o, lse, flags, full, q_bar, *q_raw = sc
  v = _Views(q_smem, kc, vc, ks, kz, vs, vz, pos, p, o, lse, flags, lambda slot: full.at[slot], q_bar,
             q_raw[0] if q_raw else None)
  split, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
  plgpu = mi.plgpu()
  plgpu.copy_gmem_to_smem(gm[0].at[b, h], v.q_raw if g.q_direct else v.q_smem, v.q_bar)
  n_st = _n_stages(g, split)
  for j in range(g.stages - 1):
    pl.when(j < n_st)(functools.partial(_issue, g, gm, v, split, b, h, j))
  _consume(g, gm, v, split, b, h, own_issue=True)


def _body_ws(g: Geometry, *gm):
  """g.consumers consumer warpgroups (one split each) and one producer warpgroup that issues every
  TMA copy, so the consumers spend no instructions on them (~14% of theirs in the one-warpgroup
  kernel, session 10's SASS). Each consumer has its own ring; it frees a slot after its stage."""
  plgpu = mi.plgpu()
  n_c, st, d, nq = g.consumers, g.stages, HEAD_DIM, g.n_q
  group, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
  wg = lax.axis_index("wg")

  def scoped(per_consumer, q_bar, *q_raw):   # per consumer: its buffers, its full and free barriers
    def views(c):
      q_smem, kc, vc, ks, kz, vs, vz, pos, p, o, lse, flags, full, _ = per_consumer[c]
      return _Views(q_smem, kc, vc, ks, kz, vs, vz, pos, p, o, lse, flags, lambda slot: full.at[slot], q_bar,
                    q_raw[0] if q_raw else None)

    @pl.when(wg == n_c)
    def _():   # the producer
      plgpu.set_max_registers(40, action="decrease")
      if g.q_direct:
        plgpu.copy_gmem_to_smem(gm[0].at[b, h], q_raw[0], q_bar)
      else:
        for c in range(n_c):
          plgpu.copy_gmem_to_smem(gm[0].at[b, h], per_consumer[c][0], q_bar)
      splits = [group * n_c + c for c in range(n_c)]
      n_sts = [_n_stages(g, sp) for sp in splits]

      @pl.loop(0, functools.reduce(jnp.maximum, n_sts))
      def _(j):
        slot = lax.rem(j, jnp.int32(st))
        for c in range(n_c):
          @pl.when(j < n_sts[c])
          def _():
            @pl.when(j >= st)
            def _():
              plgpu.barrier_wait(per_consumer[c][-1].at[slot])
            _issue(g, gm, views(c), splits[c], b, h, j)

    for c in range(n_c):
      @pl.when(wg == c)
      def _():
        plgpu.set_max_registers(CONSUMER_REGISTERS[n_c], action="increase")
        free = per_consumer[c][-1]
        _consume(g, gm, views(c), group * n_c + c, b, h, own_issue=False,
                 free=lambda slot: plgpu.barrier_arrive(free.at[slot]))

  t128, tcode = mi.tiled(128, jnp.bfloat16), mi.tiled(HEAD_DIM // 2, jnp.uint8)
  tp = mi.tiled(g.p_swizzle, jnp.bfloat16)
  sk, half, rows = g.stage_keys, HEAD_DIM // 2, g.scale_rows
  one = (
      plgpu.SMEM((nq, d), jnp.bfloat16, transforms=t128),
      plgpu.SMEM((st, sk, half), jnp.uint8, transforms=tcode),
      plgpu.SMEM((st, sk, half), jnp.uint8, transforms=tcode),
      plgpu.SMEM((st, rows, d), jnp.bfloat16),
      plgpu.SMEM((st, rows, d), jnp.bfloat16),
      plgpu.SMEM((st, sk), jnp.bfloat16),
      plgpu.SMEM((st, sk), jnp.bfloat16),
      plgpu.SMEM((st, sk), jnp.int32),
      plgpu.SMEM((nq, g.block_k) if g.p_transposed else (g.block_k, nq), jnp.bfloat16, transforms=tp),
      plgpu.SMEM((d, nq), jnp.float32),
      plgpu.SMEM((nq,), jnp.float32),
      plgpu.SMEM((4,), jnp.int32),
      plgpu.Barrier(num_arrivals=7, num_barriers=st),
      plgpu.Barrier(num_arrivals=1, num_barriers=st),     # freed by the slot's consumer
  )
  pl.run_scoped(
      scoped, (one,) * n_c, plgpu.Barrier(num_arrivals=1 if g.q_direct else n_c),
      *((plgpu.SMEM((g.rows, d), jnp.bfloat16),) if g.q_direct else ()),
      collective_axes="wg",
  )


def _consume(g: Geometry, gm, v: _Views, split, b, h, *, own_issue: bool, free=None):
  """One split on one warpgroup: wait for each TMA stage, compute its blocks, then either issue the
  stage `stages - 1` ahead itself (own_issue) or free the slot for the producer."""
  plgpu = mi.plgpu()
  q_smem, kc_smem, vc_smem, ks_smem, kz_smem, vs_smem, vz_smem, pos_smem = v[:8]
  p_smem, o_smem, lse_smem, flags = v.p, v.o, v.lse, v.flags
  qpos_ref, o_ref, lse_ref = gm[1], gm[9], gm[10]
  bk, half, stages, nq = g.block_k, HEAD_DIM // 2, g.stages, g.n_q
  n_st = _n_stages(g, split)
  rows = g.scale_rows

  wgmma_layout = plgpu.Layout.WGMMA
  key_layout, query_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)   # S^T: [keys, queries]
  scol = plgpu.Layout.WGMMA_8BIT.reduce(0)
  dequant_k = mi.int4_dequant_regs_fn(half, bk)
  dequant_v = mi.int4_value_regs_fn(half, bk)
  any_above = mi.any_above_fn() if g.lazy_max else None
  shape = (bk, nq)
  bq = lambda x: lax.broadcast_in_dim(x, shape, [1])   # [nq] -> [bk, nq]
  bkey = lambda x: lax.broadcast_in_dim(x, shape, [0])  # [bk] -> [bk, nq]
  if g.q_direct:   # one query position for every row (padded rows are zero queries: harmless columns)
    qpos_b = plgpu.layout_cast(jnp.full(shape, qpos_ref[b, 0], jnp.int32), wgmma_layout)
  else:
    qpos_b = bq(plgpu.load(qpos_ref.at[b], layout=query_layout, optimized=False))
  c = g.scale * LOG2E
  m = plgpu.layout_cast(jnp.full((nq,), -jnp.inf, jnp.float32), query_layout)
  zeros = plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)
  acc = plgpu.layout_cast(jnp.full((HEAD_DIM, nq), 0.0, jnp.float32), wgmma_layout)
  plgpu.barrier_wait(v.q_bar)
  if g.q_direct:
    mi.permute_queries_fn(g.rows, nq)(v.q_raw, q_smem)
    plgpu.commit_smem()

  q_t = q_smem.transpose((1, 0))

  def front(slot, part):  # the part-th block_k keys of the stage in `slot`: key tile and per-key rows
    keys = pl.ds(part * bk, bk)
    row = 0 if rows == 1 else part
    kscales = tuple(plgpu.load(r.at[slot, row, pl.ds(p * half, half)], layout=scol, optimized=False)
                    for r in (ks_smem, kz_smem) for p in (0, 1))
    kd = dequant_k(kc_smem.at[slot, keys], kscales)    # wgmma A registers, columns in key_channel_order
    vs = bkey(plgpu.load(vs_smem.at[slot, keys], layout=key_layout, optimized=False).astype(jnp.float32))
    vz = bkey(plgpu.load(vz_smem.at[slot, keys], layout=key_layout, optimized=False).astype(jnp.float32))
    kpos = plgpu.load(pos_smem.at[slot, keys], layout=key_layout, optimized=False)
    return kd, (vs, vz, kpos)

  def values(slot, part):  # V^T's registers (wgmma A), read while a product runs
    return dequant_v(vc_smem.at[slot, pl.ds(part * bk, bk)])

  def back(carry, s, rows_, vt, acc_ref=None):  # mask, online softmax, O^T += V^T P^T for one block
    """carry = (acc, m, l_part, zb_part); with acc_ref (g.async_pv) O^T lives in that accumulator
    and carry's acc is None: P V is issued and left in flight (the next block's S^T read waits)."""
    acc, m, l_part, zb_part = carry
    vs, vz, kpos = rows_
    kp = bkey(jnp.where(kpos >= 0, kpos, jnp.iinfo(jnp.int32).max))
    keep = kp <= qpos_b
    if g.window is not None:
      keep = keep & (qpos_b - kp < g.window)
    s = jnp.where(keep, s * c, -jnp.inf)

    def rescale(args):  # the running max moves: P, the sums and O^T in its new units
      s, m, acc, l_part, zb_part = args
      m_new = jnp.maximum(m, s.max(axis=0))
      alpha = jnp.exp2(m - mi.finite(m_new))
      a2 = bq(alpha)
      ab = lax.broadcast_in_dim(alpha, (HEAD_DIM, nq), [1])
      if acc_ref is not None:   # (every P V is done: reading S^T waited for them)
        acc_ref[...] = acc_ref[...] * ab
      else:
        acc = acc * ab
      return m_new, acc, l_part * a2, zb_part * a2

    carry = (s, m, acc, l_part, zb_part)
    if g.lazy_max:  # most blocks: no logit above m + TAU, so m stays and nothing is rescaled
      above = any_above(s, bq(m + mi.LAZY_TAU), flags)
      m, acc, l_part, zb_part = lax.cond(above, rescale, lambda a: a[1:], carry)
    else:
      m, acc, l_part, zb_part = rescale(carry)
    p = jnp.exp2(s - bq(mi.finite(m)))
    p16 = (p * vs).astype(jnp.bfloat16)   # the values' per-token scale, folded into P
    l_part = l_part + p
    # the values' zero, less the tile's 128 offset times the rounded P the MMA used (exact in f32)
    zb_part = zb_part + (p * vz - float(1 << 7) * p16.astype(jnp.float32))
    if g.p_transposed:
      p_smem.transpose((1, 0))[...] = plgpu.layout_cast(p16, plgpu.Layout.WGMMA_TRANSPOSED)
    else:
      p_smem[...] = p16
    plgpu.commit_smem()

    p_t = p_smem.transpose((1, 0)) if g.p_transposed else p_smem
    if acc_ref is not None:
      plgpu.wgmma(acc_ref, vt, p_t)    # left in flight under the next block's key unpacking
      return acc, m, l_part, zb_part

    def pv(acc_ref):  # O^T += V^T P^T (V tile holds 128 + code; registers: rows in value_channel_order)
      plgpu.wgmma(acc_ref, vt, p_t)
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    return acc, m, l_part, zb_part

  def block(carry, slot, part, acc_ref=None):
    kd, rows_ = front(slot, part)     # (async_pv: under the previous block's P V)

    def qk(acc_s):  # S^T = K Q^T: keys fill the 64-row M side, the queries N
      plgpu.wgmma(acc_s, kd, q_t)
      vt = values(slot, part)   # V^T unpacked under the product, before the read (which waits)
      return acc_s[...], vt
    s, vt = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
    return back(carry, s, rows_, vt, acc_ref)

  def stage(j, carry, acc_ref=None):
    if own_issue:
      pl.when(j + stages - 1 < n_st)(functools.partial(_issue, g, gm, v, split, b, h, j + stages - 1))

    slot = lax.rem(j, jnp.int32(stages))
    plgpu.barrier_wait(v.full(slot))   # once per arrival: the barrier tracks its phase
    for part in range(g.sub):
      carry = block(carry, slot, part, acc_ref)
    if free is not None:
      free(slot)    # every read of the slot precedes the last block's P fence
    return carry

  if g.async_pv:   # O^T in one accumulator for the whole loop, each P V left in flight
    def loop(acc_ref):
      _, m_, l_, zb_ = lax.fori_loop(0, n_st, functools.partial(stage, acc_ref=acc_ref), (None, m, zeros, zeros))
      return acc_ref[...], m_, l_, zb_
    acc, m, l_part, zb_part = pl.run_scoped(loop, plgpu.ACC((HEAD_DIM, nq), jnp.float32))
  else:
    acc, m, l_part, zb_part = lax.fori_loop(0, n_st, stage, (acc, m, zeros, zeros))
  l, zb = l_part.sum(axis=0), zb_part.sum(axis=0)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  bc = lambda x: lax.broadcast_in_dim(x, acc.shape, [1])
  o_smem[...] = (acc + bc(zb)) * bc(1.0 / l_safe)
  lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split])
  plgpu.wait_smem_to_gmem(0)


def call_kernel(g: Geometry, q, qpos, kc, ks, kz, vc, vs, vz, pos):
  """One launch: partial O^T [B, K, splits, D, n_q] (rows in value_channel_order) and lse [B, K, splits, n_q]."""
  plgpu = mi.plgpu()
  bk, d, half, st, nq, sk = g.block_k, HEAD_DIM, HEAD_DIM // 2, g.stages, g.n_q, g.stage_keys
  t128, tcode = mi.tiled(128, jnp.bfloat16), mi.tiled(half, jnp.uint8)
  tp = mi.tiled(g.p_swizzle, jnp.bfloat16)
  scratch = (
      plgpu.SMEM((nq, d), jnp.bfloat16, transforms=t128),            # queries
      plgpu.SMEM((st, sk, half), jnp.uint8, transforms=tcode),        # key codes
      plgpu.SMEM((st, sk, half), jnp.uint8, transforms=tcode),        # value codes
      plgpu.SMEM((st, g.scale_rows, d), jnp.bfloat16),                # key scale rows
      plgpu.SMEM((st, g.scale_rows, d), jnp.bfloat16),                # key zero rows
      plgpu.SMEM((st, sk), jnp.bfloat16),                             # value scales
      plgpu.SMEM((st, sk), jnp.bfloat16),                             # value zeros
      plgpu.SMEM((st, sk), jnp.int32),                                # positions
      plgpu.SMEM((nq, bk) if g.p_transposed else (bk, nq), jnp.bfloat16, transforms=tp),  # P or P^T
      plgpu.SMEM((d, nq), jnp.float32),                               # O^T
      plgpu.SMEM((nq,), jnp.float32),                                 # lse
      plgpu.SMEM((4,), jnp.int32),                                    # per-warp flags (lazy max)
      plgpu.Barrier(num_arrivals=7, num_barriers=st),
      plgpu.Barrier(),
  ) + ((plgpu.SMEM((g.rows, d), jnp.bfloat16),) if g.q_direct else ())   # raw queries (q_direct)
  out_type = (jax.ShapeDtypeStruct((g.b, g.kh, g.launched_splits, d, nq), jnp.float32),
              jax.ShapeDtypeStruct((g.b, g.kh, g.launched_splits, nq), jnp.float32))
  params = plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True)
  if g.consumers:
    return plgpu.kernel(
        functools.partial(_body_ws, g), out_type=out_type, grid=(g.launched_splits // g.consumers, g.kh, g.b),
        grid_names=("split", "head", "batch"), num_threads=g.consumers + 1, thread_name="wg",
        kernel_name="lcinfer_qdecode_mgpu_ws", compiler_params=params)(q, qpos, kc, ks, kz, vc, vs, vz, pos)
  return plgpu.kernel(
      functools.partial(_body, g), out_type=out_type, grid=(g.splits, g.kh, g.b),
      grid_names=("split", "head", "batch"), scratch_types=scratch, kernel_name="lcinfer_qdecode_mgpu",
      compiler_params=params)(q, qpos, kc, ks, kz, vc, vs, vz, pos)
