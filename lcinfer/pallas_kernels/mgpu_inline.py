"""Inline Mosaic GPU building blocks (`plgpu.inline_mgpu`) for lcinfer's Hopper kernels: register-level
work that Pallas does not express. Used by `decode_quant_mgpu_kernel.py`, `flash_mgpu_kernel.py` and
`mgpu_int4.py` (the int4 register tiles).

  * address arithmetic written once (`_IntOps` / `_ir_ops`): the numpy models the tests check run
    the same formulas the kernels emit.
  * the query tile of the int4 decode kernel built from the raw rows (`permute_queries_fn`).
  * a warpgroup-wide "any element above its bound": a warp vote plus one flag per warp in shared
    memory, read back as one uniform scalar. With LAZY_TAU and `finite`, the lazy maximum that both
    Hopper attention kernels use (FlashAttention-4's conditional rescaling).
  * the column halves of an 8-column WGMMA tile (`column_half_fn`, `swap_column_halves_fn`): the
    int4 decode kernel's packed logits.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


LAZY_TAU = 8.0     # log2 units: P may reach 2^8 before the running max moves (bf16 and f32 hold it)


def finite(m):
  """The running max with -inf (a row that has seen nothing yet) as 0: finite exponents."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def plgpu():
  """jax.experimental.pallas.mosaic_gpu, imported lazily: only Hopper paths need it."""
  import jax.experimental.pallas.mosaic_gpu as module
  return module


class _IntOps:
  """Address arithmetic on Python ints: the numpy model that tests check (`query_tile_offsets`)
  runs the same formula (`_query_addresses`) that the inline kernel emits through `_ir_ops`."""
  add = staticmethod(lambda a, b: a + b)
  mul = staticmethod(lambda a, b: a * b)
  shl = staticmethod(lambda a, b: a << b)
  shr = staticmethod(lambda a, b: a >> b)
  and_ = staticmethod(lambda a, b: a & b)
  xor = staticmethod(lambda a, b: a ^ b)
  lt = staticmethod(lambda a, b: a % (1 << 32) < b % (1 << 32))   # unsigned, as the kernel's ult
  select = staticmethod(lambda c, a, b: a if c else b)


def _ir_ops():
  """The same operations on i32 MLIR values (ints become constants)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith

  i32 = ir.IntegerType.get_signless(32)
  v = lambda x: arith.constant(i32, x) if isinstance(x, int) else x  # noqa: E731

  class Ops:
    add = staticmethod(lambda a, b: arith.addi(v(a), v(b)))
    mul = staticmethod(lambda a, b: arith.muli(v(a), v(b)))
    shl = staticmethod(lambda a, b: arith.shli(v(a), v(b)))
    shr = staticmethod(lambda a, b: arith.shrui(v(a), v(b)))
    and_ = staticmethod(lambda a, b: arith.andi(v(a), v(b)))
    xor = staticmethod(lambda a, b: arith.xori(v(a), v(b)))
    lt = staticmethod(lambda a, b: arith.cmpi(arith.CmpIPredicate.ult, v(a), v(b)))
    select = staticmethod(lambda c, a, b: arith.select(c, v(a), v(b)))
  return Ops


def lane_and_warp(o):
  """(lane, warp in the warpgroup) of this thread, as i32 values (o: `_ir_ops()`)."""
  from jax.experimental.mosaic.gpu import utils as mu
  tid = mu.thread_idx()
  return o.and_(tid, 31), o.and_(o.shr(tid, 5), 3)


def _query_addresses(o, tid, i: int, rows: int, shift: int = 0):
  """`permute_queries_fn`'s addresses for thread tid (0-127) and pass i: (real row?, the 4 source
  byte offsets in the raw tile, the destination byte offset in the swizzled tile). Tile row r holds
  raw row r - shift (rows shift .. shift + rows - 1 real)."""
  col_tile, r0 = o.and_(tid, 15), o.shr(tid, 4)
  j, p = o.shr(col_tile, 2), o.and_(col_tile, 3)
  base = o.add(o.add(o.shl(o.shr(p, 1), 6), o.shl(j, 4)), o.shl(o.and_(p, 1), 1))
  r = o.add(r0, 8 * i)
  rs = o.add(r, -shift)
  real = o.lt(rs, rows)   # unsigned: rows before the shift wrap around
  r_src = o.select(real, rs, 0)
  src = [o.shl(o.add(o.mul(r_src, 128), o.add(base, 4 * w)), 1) for w in range(4)]
  r7 = o.and_(r, 7)
  tile = o.add(o.shl(o.shr(r, 3), 1), o.shr(col_tile, 3))
  chunk = o.xor(o.and_(col_tile, 7), r7)
  return real, src, o.add(o.add(o.mul(tile, 1024), o.mul(r7, 128)), o.shl(chunk, 4))


def query_tile_offsets(rows: int, n_q: int, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The addresses `permute_queries_fn` uses, as numpy (for tests): for thread t and pass i (row
  r = 8 i + t // 16, column tile J = t % 16 of 8 wgmma K indices), src[t, i, w] = the byte offset in
  the raw [rows, 128] bf16 query tile of the w-th pair of channels those 8 indices hold
  (`key_channel_order`: channels b, b+1, b+4, b+5, .. b+13) or -1 past the real rows, and
  dst[t, i] = the byte offset of those 16 bytes in the [n_q, 128] tile as TMA writes it (8 x 64
  tiles of 1 KB, 128-byte swizzle: 16-byte chunk J % 8 ^ r % 8)."""
  src = np.full((128, n_q // 8, 4), -1, np.int64)
  dst = np.empty((128, n_q // 8), np.int64)
  for t, i in np.ndindex(128, n_q // 8):
    real, offs, dst[t, i] = _query_addresses(_IntOps, t, i, rows, shift)
    if real:
      src[t, i] = offs
  return src, dst


def permute_queries_fn(rows: int, n_q: int, shift: int = 0):
  """inline Mosaic GPU: raw queries smem [rows, 128] bf16 (one kv head's rows as TMA brought them
  from [B, 1, H, D]) -> the wgmma B tile [n_q, 128] (128-byte swizzle) with its columns in
  `key_channel_order` and rows past `rows` zero: 4 shared loads and one 16-byte store per thread
  and 8 rows (addresses: `query_tile_offsets`). shift: the rows land `shift` rows down (rows before
  them zero). The caller fences (commit_smem) before the wgmma."""
  pg = plgpu()
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  @pg.inline_mgpu(arg_types=(pg.RefType(), pg.RefType(tiled(128, jnp.bfloat16))))
  def permute(ctx, raw_ref, q_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    o = _ir_ops()
    tid = o.and_(mu.thread_idx(), 127)
    raw = llvm.ptrtoint(i32, mu.memref_ptr(raw_ref))
    out = llvm.ptrtoint(i32, mu.memref_ptr(q_ref))
    for i in range(n_q // 8):
      real, offs, dst = _query_addresses(o, tid, i, rows, shift)
      words = []
      for off in offs:
        word = llvm.inline_asm(i32, [arith.addi(raw, off)], "ld.shared.b32 $0, [$1];", "=r,r",
                               has_side_effects=True)
        words.append(o.select(real, word, 0))
      llvm.inline_asm(ir.Type.parse("!llvm.void"), [arith.addi(out, dst), *words],
                      "st.shared.v4.b32 [$0], {$1, $2, $3, $4};", "r,r,r,r,r", has_side_effects=True)

  return permute


def _vote_op(layout, barrier: bool):
  """The inline op vote(s, bound, flags): each thread ORs its registers' s > bound, a warp vote ORs
  the warp, lane stores put one flag per warp in flags smem [4] int32; then a warpgroup barrier
  (barrier=True) or none (the caller's next barrier publishes the flags)."""
  pg = plgpu()
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, memref, vector

  layout = pg.Layout.WGMMA if layout is None else layout

  @pg.inline_mgpu(arg_types=(layout, layout, pg.RefType()))
  def vote(ctx, s, bound, flags_ref):
    del ctx
    i1 = ir.IntegerType.get_signless(1)
    i32 = ir.IntegerType.get_signless(32)
    pred = arith.constant(i1, 0)
    for a, b in zip(s.registers.flat, bound.registers.flat):
      gt = arith.cmpf(arith.CmpFPredicate.OGT, a, b)
      if isinstance(gt.type, ir.VectorType):
        gt = vector.reduction(i1, vector.CombiningKind.OR, gt)
      pred = arith.ori(pred, gt)
    vote = llvm.inline_asm(i32, [arith.extui(i32, pred)],
                           "{ .reg .pred p, q; setp.ne.u32 p, $1, 0; vote.sync.any.pred q, p, 0xffffffff; "
                           "selp.u32 $0, 1, 0, q; }", "=r,r")
    warp = arith.remui(mu.warp_idx(sync=False), arith.constant(i32, 4))
    memref.store(vote, flags_ref, [arith.index_cast(ir.IndexType.get(), warp)])
    if barrier:
      mu.warpgroup_barrier()

  return vote


def vote_fn(layout=None):
  """vote(s, bound, flags): one flag per warp in flags [4] int32, whether any element of s exceeds
  bound (`_vote_op`), with no barrier: the flags may be read after the caller's next warpgroup
  barrier (e.g. `commit_smem`), and the same buffer written again only after every warp read it."""
  return _vote_op(layout, barrier=False)


def any_above_fn(layout=None):
  """any_above(s, bound, flags) -> a warpgroup-uniform bool scalar: does any element of s exceed
  bound (same shape, both in `layout`, default WGMMA)? The vote (`_vote_op`), then a warpgroup
  barrier; the four flags are read back. A caller that votes again before every warp has read the
  flags needs a second flags buffer (or a barrier in between)."""
  vote = _vote_op(layout, barrier=True)

  def any_above(s, bound, flags):
    vote(s, bound, flags)
    return flags[0] + flags[1] + flags[2] + flags[3] > 0

  return any_above


def tiled(swizzle: int, dtype):
  pg = plgpu()
  return (pg.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), pg.SwizzleTransform(swizzle))


def column_half_fn(shape):
  """inline Mosaic GPU: an int32 array of `shape` ([rows, 8], WGMMA layout) holding each element's
  column // 4. In that layout lane l of a warp holds columns 2 (l % 4) and 2 (l % 4) + 1 of its
  rows, so the value is (l >> 1) & 1 for all of a thread's elements (`test_column_halves_...`)."""
  pg = plgpu()
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, vector

  if shape[-1] != 8:
    raise ValueError(f"column halves of an 8-column tile, got {shape}")

  @pg.inline_mgpu(return_type=pg.ShapeDtypeStruct(shape, jnp.int32, layout=pg.Layout.WGMMA))
  def halves(ctx):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    k = lambda x: arith.constant(i32, x)  # noqa: E731
    half = arith.andi(arith.shrui(mu.thread_idx(), k(1)), k(1))
    reg_t = fa.WGMMA_LAYOUT.registers_element_type(i32)
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
    for idx in np.ndindex(regs.shape):
      regs[idx] = vector.broadcast(reg_t, half)
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=True)

  return halves


def swap_column_halves_fn(shape):
  """inline Mosaic GPU: a float32 [rows, 8] array (WGMMA layout) with columns c and c ^ 4 swapped:
  one shfl.bfly 2 per element, since lane l ^ 2 holds columns 2 (l % 4) ^ 4 .. of the same rows."""
  pg = plgpu()
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm, vector

  if shape[-1] != 8:
    raise ValueError(f"column halves of an 8-column tile, got {shape}")
  layout = pg.Layout.WGMMA

  @pg.inline_mgpu(arg_types=(layout,),
                  return_type=pg.ShapeDtypeStruct(shape, jnp.float32, layout=layout))
  def swap(ctx, x):
    del ctx
    f32 = ir.F32Type.get()
    out = np.empty(x.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(x.registers):
      n = ir.VectorType(reg.type).shape[0]
      vals = [llvm.inline_asm(f32, [vector.extract(reg, [], [e])], "shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;",
                              "=f,f", has_side_effects=True) for e in range(n)]
      out[idx] = vector.from_elements(reg.type, vals)
    return mgpu.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return swap
