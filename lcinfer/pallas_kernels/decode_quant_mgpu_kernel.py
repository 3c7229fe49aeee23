"""The Hopper int4 KIVI flash-decoding kernel (Pallas, Mosaic GPU lowering): its body and launch (its
`Geometry`: `decode_quant_mgpu_geometry.py`). Design, contract and measurements: `decode_quant_mgpu.py`,
whose wrapper prepares the queries, builds the `Geometry` and combines the splits."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import mgpu_inline as mi
from lcinfer.pallas_kernels import mgpu_int4
from lcinfer.pallas_kernels.decode_quant_mgpu_geometry import Geometry
from lcinfer.pallas_kernels.online_softmax import LN2, LOG2E

HEAD_DIM = 128


class _Views(NamedTuple):
  """The CTA's shared memory: queries, TMA ring of the codes, the two-slot ring of the per-key rows
  (ks, kz, vs, vz, pos), P, O^T / lse staging, vote flags, the rings' barriers (`full`, one per code
  slot; `meta_full`, one per meta slot) and the queries' (`q_bar`); q_raw: the raw query rows
  (q_direct) or None; q_hi: block 1's query tile (packed) or None."""
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
  full: Any
  meta_full: Any
  q_bar: Any
  q_raw: Any
  q_hi: Any


def _n_stages(g: Geometry, split):
  """TMA stages of a split."""
  n = jnp.clip(g.n_blocks - split * g.blocks_per_split, 0, g.blocks_per_split)
  return lax.div(n, jnp.int32(g.sub))


def _split_start(g: Geometry, split):
  return split * (g.blocks_per_split * g.block_k)


def _issue(g: Geometry, gm, v: _Views, split, b, h, j):
  """Stage j of `split` (blocks first + sub j ..): its two code tiles into ring slot j % stages (code
  rows of the [B, K, C / code_rows, 64 code_rows] views)."""
  kc_ref, vc_ref = gm[2], gm[5]
  slot = lax.rem(j, jnp.int32(g.stages))
  n = g.stage_keys // g.code_rows   # code rows per stage
  first = lax.div(_split_start(g, split) + j * g.stage_keys, jnp.int32(g.code_rows))
  rows = pl.ds(pl.multiple_of(first, n), n)
  _copies(g, j, [(kc_ref.at[b, h, rows], v.kc.at[slot]), (vc_ref.at[b, h, rows], v.vc.at[slot])], v.full.at[slot])


def _issue_meta(g: Geometry, gm, v: _Views, split, b, h, n):
  """Chunk n of `split`'s per-key rows (stages n * meta ..) into meta slot n % 2: 5 copies of
  meta_keys keys (or meta_rows key-scale rows) each, instead of 5 small copies per stage: the
  small copies cost ~7 of 46 us of load time at 128K (session 12, copies without compute)."""
  ks_ref, kz_ref, vs_ref, vz_ref, pos_ref = (gm[i] for i in (3, 4, 6, 7, 8))
  slot = lax.rem(n, jnp.int32(2))
  start = pl.multiple_of(_split_start(g, split) + n * g.meta_keys, g.meta_keys)
  grps = pl.ds(lax.div(start, jnp.int32(g.group)), g.meta_rows)
  keys = pl.ds(split * (g.blocks_per_split // g.sub) + n * g.meta, g.meta)   # [.., C / sk, sk] rows
  _copies(g, n, [(ks_ref.at[b, h, grps], v.ks.at[slot]), (kz_ref.at[b, h, grps], v.kz.at[slot]),
                 (vs_ref.at[b, h, keys], v.vs.at[slot]), (vz_ref.at[b, h, keys], v.vz.at[slot]),
                 (pos_ref.at[b, h, keys], v.pos.at[slot])], v.meta_full.at[slot])


def _copies(g: Geometry, j, pairs, barrier):
  """TMA copies (src, dst) arriving on `barrier`. With g.issue_warp only warp j % 4 runs them (warp
  semantics: its 32 threads arrive for the warpgroup, one issues), so the other three skip the
  address work (~58 instructions per warp and block in session 10's SASS), and the rotation
  spreads it over the SM's four schedulers (warp w of every CTA sits on scheduler w)."""
  plgpu = mi.plgpu()

  def copies():
    for src, dst in pairs:
      plgpu.copy_gmem_to_smem(src, dst, barrier)

  if not g.issue_warp:
    copies()   # warpgroup semantics: every warp computes the descriptors' addresses, one thread issues
    return

  def one_warp(warp):
    pl.when(warp == lax.rem(j, jnp.int32(4)))(copies)
  plgpu.warp_map(one_warp)


def _body(g: Geometry, *refs):
  """One warpgroup per CTA: it issues its own TMA stages and computes."""
  gm, sc = refs[:11], refs[11:]
  q_smem, kc, vc, ks, kz, vs, vz, pos, p, o, lse, flags, full, meta_full, q_bar, *rest = sc
  v = _Views(q_smem, kc, vc, ks, kz, vs, vz, pos, p, o, lse, flags, full, meta_full, q_bar,
             rest[0] if g.q_direct else None, rest[-1] if g.packed else None)
  split, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
  plgpu = mi.plgpu()
  plgpu.copy_gmem_to_smem(gm[0].at[b, h], v.q_raw if g.q_direct else v.q_smem, v.q_bar)
  n_st = _n_stages(g, split)
  if g.probe != "codes":
    pl.when(0 < n_st)(functools.partial(_issue_meta, g, gm, v, split, b, h, 0))
  for j in range(g.stages - 1):
    pl.when(j < n_st)(functools.partial(_issue, g, gm, v, split, b, h, j))
  _consume(g, gm, v, split, b, h)


def _consume(g: Geometry, gm, v: _Views, split, b, h):
  """One split on one warpgroup: issue the TMA stage `stages - 1` ahead, wait for this one, compute
  its blocks."""
  plgpu = mi.plgpu()
  q_smem, kc_smem, vc_smem, ks_smem, kz_smem, vs_smem, vz_smem, pos_smem = v[:8]
  p_smem, o_smem, lse_smem, flags = v.p, v.o, v.lse, v.flags
  qpos_ref, o_ref, lse_ref = gm[1], gm[9], gm[10]
  bk, half, stages, nq = g.block_k, HEAD_DIM // 2, g.stages, g.n_q
  n_st = _n_stages(g, split)
  wgmma_layout = plgpu.Layout.WGMMA
  key_layout, query_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)   # S^T: [keys, queries]
  scol = plgpu.Layout.WGMMA_8BIT.reduce(0)
  dequant_k = mgpu_int4.int4_dequant_regs_fn(half, bk, g.code_swizzle)
  dequant_v = mgpu_int4.int4_value_regs_fn(half, bk, g.code_swizzle)
  tile = lambda part: pl.ds(part * bk // g.code_rows, bk // g.code_rows)   # a block's rows of a code tile
  vote = mi.vote_fn() if g.lazy_max else None
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
    if g.packed:   # block 1's queries: the same rows, 4 down
      mi.permute_queries_fn(g.rows, nq, shift=nq // 2)(v.q_raw, v.q_hi)
    plgpu.commit_smem()

  q_t = q_smem.transpose((1, 0))
  q_ts = (q_t, v.q_hi.transpose((1, 0))) if g.packed else (q_t, q_t)
  hi = mi.column_half_fn(shape)() == 1 if g.packed else None   # g.packed: the columns of block 1

  def front(slot, at, part):
    """The part-th block_k keys of the stage in code slot `slot`, whose per-key rows start at
    at = (meta slot, key offset in the chunk, the chunk's first key): key tile and per-key rows."""
    mslot, off, first = at
    row = lax.div(first + off + part * bk, jnp.int32(g.group)) - lax.div(first, jnp.int32(g.group))
    kscales = tuple(plgpu.load(r.at[mslot, row, pl.ds(p * half, half)], layout=scol, optimized=False)
                    for r in (ks_smem, kz_smem) for p in (0, 1))
    kd = dequant_k(kc_smem.at[slot, tile(part)], kscales)    # wgmma A registers, columns in key_channel_order
    jr, mkeys = lax.div(off, jnp.int32(g.stage_keys)), pl.ds(part * bk, bk)
    vs = bkey(plgpu.load(vs_smem.at[mslot, jr, mkeys], layout=key_layout, optimized=False).astype(jnp.float32))
    vz = bkey(plgpu.load(vz_smem.at[mslot, jr, mkeys], layout=key_layout, optimized=False).astype(jnp.float32))
    kpos = plgpu.load(pos_smem.at[mslot, jr, mkeys], layout=key_layout, optimized=False)
    return kd, (vs, vz, bkey(jnp.where(kpos >= 0, kpos, jnp.iinfo(jnp.int32).max)))   # empty slots: never seen

  def values(slot, part):  # V^T's registers (wgmma A), read while a product runs
    return dequant_v(vc_smem.at[slot, tile(part)])

  def masked(s, rows_):  # logits in base-2 units, invisible keys -inf
    _, _, kp = rows_
    keep = kp <= qpos_b
    if g.window is not None:
      keep = keep & (qpos_b - kp < g.window)
    return jnp.where(keep, s * c, -jnp.inf)

  def back(carry, ss, rows_list, vts, vote_at):
    """Online softmax over the blocks' masked S^T tiles `ss` (one block, or a stage's two with
    g.pair), then O^T += V^T P^T for each; carry = (acc, m, l_part, zb_part). One vote, one P fence
    and one wait for the products whatever the block count. vote_at: the flags buffer (0 / 1) of
    this vote (alternate buffers: a warp may vote again before another has read)."""
    acc, m, l_part, zb_part = carry
    s_max = functools.reduce(jnp.maximum, ss)

    def rescale(args):  # the running max moves: P, the sums and O^T in its new units
      s_max, m, acc, l_part, zb_part = args
      m_new = jnp.maximum(m, s_max.max(axis=0))
      alpha = jnp.exp2(m - mi.finite(m_new))
      a2 = bq(alpha)
      return m_new, acc * lax.broadcast_in_dim(alpha, acc.shape, [1]), l_part * a2, zb_part * a2

    def store_p(i, p16):
      if g.p_transposed:
        p_smem[i].transpose((1, 0))[...] = plgpu.layout_cast(p16, plgpu.Layout.WGMMA_TRANSPOSED)
      else:
        p_smem[i][...] = p16

    def softmax(m, l_part, zb_part):   # P in the max m into its tiles (not yet fenced), and the sums
      for i, (s, (vs, vz, _)) in enumerate(zip(ss, rows_list)):
        p = jnp.exp2(s - bq(mi.finite(m)))
        p16 = (p * vs).astype(jnp.bfloat16)   # the values' per-token scale, folded into P
        l_part = l_part + p
        # the values' zero, less the tile's 128 offset times the rounded P the MMA used (exact in f32)
        zb_part = zb_part + (p * vz - float(1 << 7) * p16.astype(jnp.float32))
        if g.packed:   # block 0's P (columns 0-3) and block 1's (4-7), each beside zeros, for its own P V
          store_p(0, jnp.where(hi, jnp.bfloat16(0), p16))
          store_p(1, jnp.where(hi, p16, jnp.bfloat16(0)))
        else:
          store_p(i, p16)
      return l_part, zb_part

    args = (s_max, m, acc, l_part, zb_part)
    if g.lazy_max:   # speculative P: vote, P in the current max, one fence for both; redo after a rescale (rare)
      vote_flags = flags.at[vote_at]
      vote(s_max, bq(m + mi.LAZY_TAU), vote_flags)
      l_new, zb_new = softmax(m, l_part, zb_part)
      plgpu.commit_smem()

      def redo(args):
        m, acc, l_part, zb_part = rescale(args)
        l_part, zb_part = softmax(m, l_part, zb_part)
        plgpu.commit_smem()
        return m, acc, l_part, zb_part
      above = vote_flags[0] + vote_flags[1] + vote_flags[2] + vote_flags[3] > 0
      m, acc, l_part, zb_part = lax.cond(above, redo, lambda a: (a[1], a[2], l_new, zb_new), args)
    else:   # the max recomputed every block
      m, acc, l_part, zb_part = rescale(args)
      l_part, zb_part = softmax(m, l_part, zb_part)
      plgpu.commit_smem()
    p_ts = [p_smem[i].transpose((1, 0)) if g.p_transposed else p_smem[i] for i in range(len(vts))]

    def pv(acc_ref):  # O^T += V^T P^T (V tile holds 128 + code; registers: rows in value_channel_order)
      for vt, p_t in zip(vts, p_ts):
        plgpu.wgmma(acc_ref, vt, p_t)
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    return acc, m, l_part, zb_part

  def blocks(carry, slot, at, parts, vote_at):
    """The stage's blocks `parts` through one product wait: S^T = K Q^T for each (keys fill the
    64-row M side, the queries N; the next block's keys unpacked under the previous product), then
    the V^T tiles unpacked under the products, before the reads."""
    def qk(*acc_s):
      rows_list = []
      for i, part in enumerate(parts):   # g.packed: both blocks into one accumulator, block 1 in columns 4-7
        kd, rows_ = front(slot, at, part)
        plgpu.wgmma(acc_s[0 if g.packed else i], kd, q_ts[i])
        rows_list.append(rows_)
      vts = [values(slot, part) for part in parts]
      return [acc_ref[...] for acc_ref in acc_s], rows_list, vts   # the first read waits for every product
    n_acc = 1 if g.packed else len(parts)
    ss, rows_list, vts = pl.run_scoped(qk, *(plgpu.ACC(shape, jnp.float32) for _ in range(n_acc)))
    if g.packed:   # each column's per-key rows from its block
      rows_list = [tuple(jnp.where(hi, r1, r0) for r0, r1 in zip(*rows_list))]
    if g.probe == "keys":   # keep the products alive, skip the rest
      acc, m, l_part, zb_part = carry
      return acc, m, functools.reduce(jnp.add, [masked(s, r) for s, r in zip(ss, rows_list)], l_part), zb_part
    return back(carry, [masked(s, r) for s, r in zip(ss, rows_list)], rows_list, vts, vote_at)

  def stage(j, carry):
    pl.when(j + stages - 1 < n_st)(functools.partial(_issue, g, gm, v, split, b, h, j + stages - 1))
    n, jr = lax.div(j, jnp.int32(g.meta)), lax.rem(j, jnp.int32(g.meta))
    if g.probe != "codes":   # the next chunk of per-key rows, one stage ahead (its slot's last reader was
      # stage n * meta - 1, whose P fence came before this)
      pl.when((jr == g.meta - 1) & (j + 1 < n_st))(functools.partial(_issue_meta, g, gm, v, split, b, h, n + 1))
    mslot = lax.rem(n, jnp.int32(2))
    if g.probe != "codes":
      pl.when(jr == 0)(lambda: plgpu.barrier_wait(v.meta_full.at[mslot]))

    slot = lax.rem(j, jnp.int32(stages))
    plgpu.barrier_wait(v.full.at[slot])   # once per arrival: the barrier tracks its phase
    if g.probe in ("copies", "codes"):
      return carry
    at = (mslot, jr * g.stage_keys, _split_start(g, split) + n * g.meta_keys)
    if g.pair:
      return blocks(carry, slot, at, range(g.sub), lax.rem(j, jnp.int32(2)))
    for part in range(g.sub):   # sub votes per stage: their flags buffers alternate as they come
      carry = blocks(carry, slot, at, [part], lax.rem(j * g.sub + part, jnp.int32(2)))
    return carry

  acc, m, l_part, zb_part = lax.fori_loop(0, n_st, stage, (acc, m, zeros, zeros))
  l, zb = l_part.sum(axis=0), zb_part.sum(axis=0)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  bc = lambda x: lax.broadcast_in_dim(x, acc.shape, [1])
  out = (acc + bc(zb)) * bc(1.0 / l_safe)
  lse2 = jnp.where(seen, m + jnp.log2(l_safe), -jnp.inf)   # base 2
  if g.packed:   # the two halves' online softmaxes (columns n, n + 4: the same query) merged by lse
    swap = mi.swap_column_halves_fn(acc.shape)
    lse2_b = bc(lse2)
    other_b = swap(lse2_b)
    top = mi.finite(jnp.maximum(lse2_b, other_b))
    w, w_other = jnp.exp2(lse2_b - top), jnp.exp2(other_b - top)
    tot = w + w_other
    tot_safe = jnp.where(tot > 0.0, tot, 1.0)
    out = (out * w + swap(out) * w_other) / tot_safe
    lse2 = jnp.where(tot > 0.0, top + jnp.log2(tot_safe), -jnp.inf).max(axis=0)   # (equal rows)
  o_smem[...] = out
  lse_smem[...] = lse2 * LN2
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split])
  plgpu.wait_smem_to_gmem(0)


def call_kernel(g: Geometry, q, qpos, kc, ks, kz, vc, vs, vz, pos):
  """One launch: partial O^T [B, K, splits, D, n_q] (rows in value_channel_order) and lse [B, K, splits, n_q]."""
  plgpu = mi.plgpu()
  bk, d, half, st, nq, sk = g.block_k, HEAD_DIM, HEAD_DIM // 2, g.stages, g.n_q, g.stage_keys
  cw = half * g.code_rows   # bytes per row of a code tile
  t128, tcode = mi.tiled(128, jnp.bfloat16), mi.tiled(g.code_swizzle, jnp.uint8)
  tp = mi.tiled(g.p_swizzle, jnp.bfloat16)
  scratch = (
      plgpu.SMEM((nq, d), jnp.bfloat16, transforms=t128),            # queries
      plgpu.SMEM((st, sk // g.code_rows, cw), jnp.uint8, transforms=tcode),   # key codes
      plgpu.SMEM((st, sk // g.code_rows, cw), jnp.uint8, transforms=tcode),   # value codes
      plgpu.SMEM((2, g.meta_rows, d), jnp.bfloat16),                  # key scale rows (meta ring)
      plgpu.SMEM((2, g.meta_rows, d), jnp.bfloat16),                  # key zero rows
      plgpu.SMEM((2, g.meta, sk), jnp.bfloat16),                      # value scales
      plgpu.SMEM((2, g.meta, sk), jnp.bfloat16),                      # value zeros
      plgpu.SMEM((2, g.meta, sk), jnp.int32),                         # positions
      tuple(plgpu.SMEM((nq, bk) if g.p_transposed else (bk, nq), jnp.bfloat16, transforms=tp)
            for _ in range(g.p_tiles)),                               # P or P^T, one per block at once
      plgpu.SMEM((d, nq), jnp.float32),                               # O^T
      plgpu.SMEM((nq,), jnp.float32),                                 # lse
      plgpu.SMEM((2, 4), jnp.int32),                                  # per-warp flags (lazy max), two buffers
      plgpu.Barrier(num_arrivals=2, num_barriers=st),                 # code slots
      plgpu.Barrier(num_arrivals=5, num_barriers=2),                  # meta slots
      plgpu.Barrier(),
  ) + ((plgpu.SMEM((g.rows, d), jnp.bfloat16),) if g.q_direct else ()  # raw queries (q_direct)
  ) + ((plgpu.SMEM((nq, d), jnp.bfloat16, transforms=t128),) if g.packed else ())   # block 1's queries
  out_type = (jax.ShapeDtypeStruct((g.b, g.kh, g.out_splits, d, nq), jnp.float32),
              jax.ShapeDtypeStruct((g.b, g.kh, g.out_splits, nq), jnp.float32))
  params = plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True)
  return plgpu.kernel(
      functools.partial(_body, g), out_type=out_type, grid=(g.splits, g.kh, g.b),
      grid_names=("split", "head", "batch"), scratch_types=scratch, kernel_name="lcinfer_qdecode_mgpu",
      compiler_params=params)(q, qpos, kc, ks, kz, vc, vs, vz, pos)
