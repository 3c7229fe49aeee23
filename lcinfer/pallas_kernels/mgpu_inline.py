"""Inline Mosaic GPU building blocks (`plgpu.inline_mgpu`) for lcinfer's Hopper kernels: register-level
work that Pallas does not express. Used by `decode_quant_mgpu_kernel.py` and `flash_mgpu_kernel.py`.

  * int4 tiles straight into wgmma's A registers, by the "magic number" of fast int4 GEMMs (Kim et
    al. 2022, Sec. 4): lop3 ORs a nibble into the mantissa of 128.0 (x = 128 + c exactly).
    Keys (`int4_dequant_regs_fn`): 4 code bytes of a row (bit planes over channel halves, as
    `quant.py` packs them) -> 8 values c * s + z (sub + fma, one rounding), columns in a fixed
    permutation (`key_channel_order`) that the queries take too. Values (`int4_value_regs_fn`):
    V^T read by `ldmatrix.trans`, which puts two keys' bytes in one register, -> x = 128 + c with
    3 shifts and 4 lop3 per 8 values, rows in `value_channel_order` (O^T's rows come out in it).
  * a warpgroup-wide "any element above its bound": a warp vote plus one flag per warp in shared
    memory, read back as one uniform scalar. With LAZY_TAU and `finite`, the lazy maximum that both
    Hopper attention kernels use (FlashAttention-4's conditional rescaling).
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


def int4_unpack_asm() -> str:
  """PTX: $4 = 4 code bytes of a key row (channels c..c+3 in the low nibbles, c+D/2.. in the high
  ones) -> $0, $1: the low channels, $2, $3: the high ones, as bf16x2 pairs of c * s + z: lop3 ORs
  the nibble into the mantissa of 128.0 (x = 128 + code exactly), sub makes c = x - 128 exactly,
  fma applies the scale pairs $5..$8 and zero pairs $9..$12 (low 01, 23, high 01, 23) with one
  rounding."""
  lines = ["{", ".reg .b32 z, a, b, t, m;", "mov.b32 z, 0;", "mov.b32 m, 0x43004300;",
           "prmt.b32 a, $4, z, 0x4140;", "prmt.b32 b, $4, z, 0x4342;"]
  for out, src in enumerate(("a", "b", "a", "b")):
    if out == 2:  # a >> 4 lets byte 1's low nibble into bits 12-15 of lane 0: the mask drops it
      lines += ["shr.b32 a, a, 4;", "shr.b32 b, b, 4;"]
    lines += [f"lop3.b32 t, {src}, 0x000F000F, 0x43004300, 0xEA;", "sub.rn.bf16x2 t, t, m;",
              f"fma.rn.bf16x2 ${out}, t, ${5 + out}, ${9 + out};"]
  return "\n".join(lines + ["}"])


def a_column_tile(j: int, p: int) -> int:
  """Where `int4_dequant_regs_fn` puts pair p (low nibbles 01, 23, high 01, 23) of code column tile j
  (16 code bytes): wgmma A column tile 4 j + p (8 columns; the same rows)."""
  return 4 * j + p


def key_channel_order(code_bytes: int = 64) -> np.ndarray:
  """order[kappa]: the channel that wgmma's K index kappa holds when `int4_dequant_regs_fn` builds
  the key tile straight in A registers (D = 2 code_bytes). The B side (the queries) is permuted the
  same way, q[..., order], so the product is unchanged. Thread t = lane % 4 of a row holds code
  bytes 16 j + 4 t .. + 3 (WGMMA_LAYOUT_8BIT; byte b holds channels b and b + D/2) and A columns
  8 J + 2 t + {0, 1} (WGMMA_LAYOUT), with J = a_column_tile(j, p)."""
  order = np.empty(2 * code_bytes, np.int64)
  for j, p, t, e in np.ndindex(code_bytes // 16, 4, 4, 2):
    order[8 * a_column_tile(j, p) + 2 * t + e] = code_bytes * (p >= 2) + 16 * j + 4 * t + 2 * (p % 2) + e
  return order


def _unpack_registers(codes, scales):
  """Per code register of `codes` (WGMMA_LAYOUT_8BIT, [bk, D/2] uint8): the four bf16x2 pairs of
  `int4_unpack_asm` (low 01, low 23, high 01, high 23) as i32 values."""
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm
  i32 = ir.IntegerType.get_signless(32)
  scales = [x.broadcast_in_dim(codes.shape, (1,), codes.layout) for x in scales]

  def words(v):  # vector<4xbf16> -> two i32 (pairs 01, 23)
    return [mu.bitcast(mu.vector_slice(v, slice(i, i + 2)), i32) for i in (0, 2)]

  asm = int4_unpack_asm()
  out_ty = llvm.StructType.get_literal([i32] * 4)
  constraints = "=r,=r,=r,=r," + ",".join(["r"] * 9)
  for idx in np.ndindex(codes.registers.shape):
    ins = [mu.bitcast(codes.registers[idx], i32)]
    for x in scales:
      ins += words(x.registers[idx])
    res = llvm.inline_asm(out_ty, ins, asm, constraints)
    yield idx, [llvm.extractvalue(i32, res, [i]) for i in range(4)]


def int4_dequant_regs_fn(code_bytes: int, bk: int):
  """inline Mosaic GPU: codes smem [bk, code_bytes] uint8 and the per-channel (s, s, z, z) halves ->
  x = c * s + z as a [bk, 2 code_bytes] bf16 array in WGMMA layout (wgmma's A registers), its
  columns in `key_channel_order`: no shared-memory tile and no stores."""
  pg = plgpu()
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir

  if code_bytes != 64:
    raise ValueError(f"register key tiles need head_dim 128 (code_bytes 64), got {code_bytes}")
  code_t = pg.RefType(tiled(code_bytes, jnp.uint8))
  scale_types = (pg.Layout.WGMMA_8BIT.reduce(0),) * 4

  @pg.inline_mgpu(arg_types=(code_t, scale_types),
                  return_type=pg.ShapeDtypeStruct((bk, 2 * code_bytes), jnp.bfloat16, layout=pg.Layout.WGMMA))
  def dequant(ctx, codes_ref, scales):
    del ctx
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    codes = mgpu.FragmentedArray.load_tiled(codes_ref, swizzle=code_bytes, is_signed=False,
                                            layout=fa.WGMMA_LAYOUT_8BIT)
    out = np.empty(fa.WGMMA_LAYOUT.registers_shape((bk, 2 * code_bytes)), dtype=object)
    for idx, outs in _unpack_registers(codes, scales):
      for p in range(4):   # code column tile j = idx[1] -> A column tile a_column_tile(j, p), same rows
        out[(idx[0], a_column_tile(idx[1], p), *idx[2:])] = mu.bitcast(outs[p], pair)
    return mgpu.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return dequant


VALUE_UNPACK_ASM = "\n".join([
    "{", ".reg .b32 t;",
    "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;",
    "shr.b32 t, $4, 8;", "lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xEA;",
    "shr.b32 t, $4, 4;", "lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xEA;",
    "shr.b32 t, $4, 12;", "lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xEA;", "}"])
"""PTX: $4 = one register of `ldmatrix .trans` over the value codes, bytes (k.2p, k.2p+1, k1.2p, k1.2p+1)
of keys k, k + 1 -> four bf16x2 pairs (key k low, key k + 1 high) of x = 128 + code: $0 the low nibble
of byte 2p, $1 of byte 2p + 1, $2 the high nibble of byte 2p, $3 of byte 2p + 1. No prmt: the
two keys' bytes already sit 16 bits apart."""


def value_channel_order(code_bytes: int = 64) -> np.ndarray:
  """order[R]: the channel that row R of the value tile built by `int4_value_regs_fn` holds (V^T as
  wgmma's A, [D, bk]); O^T comes out with its rows in this order. A row R = 64 mt + 16 w + 8 rh + j
  of warp w, lane j * 4 + i holds byte 16 w + 2 j (+1 if rh) of the codes, its low nibble (mt = 0,
  channel b) or its high one (mt = 1, channel b + D/2)."""
  if code_bytes != 64:
    raise ValueError(f"register value tiles need head_dim 128 (code_bytes 64), got {code_bytes}")
  order = np.empty(2 * code_bytes, np.int64)
  for mt, w, rh, j in np.ndindex(2, 4, 2, 8):
    order[64 * mt + 16 * w + 8 * rh + j] = code_bytes * mt + 16 * w + 2 * j + rh
  return order


def ldmatrix_row_offsets(code_bytes: int = 64) -> np.ndarray:
  """offsets[w, lane]: the byte offset (in a [bk, code_bytes] uint8 tile with a 64-byte TMA
  swizzle) of the 16-byte row that lane supplies to warp w's first `ldmatrix.x4.trans`: matrix
  lane // 8 (keys 8 (lane // 8) ..), row lane % 8, and the warp's 16-byte chunk w, moved by the
  swizzle (chunk ^ bits 7-8 of the address, i.e. (key // 2) % 4). The next x4 is 2048 bytes on."""
  offsets = np.empty((4, 32), np.int64)
  for w, lane in np.ndindex(4, 32):
    key = 8 * (lane // 8) + lane % 8
    offsets[w, lane] = code_bytes * key + 16 * (w ^ ((key >> 1) & 3))
  return offsets


def int4_value_regs_fn(code_bytes: int, bk: int):
  """inline Mosaic GPU: value codes smem [bk, code_bytes] uint8 (TMA, 64-byte swizzle) -> V^T as a
  [2 code_bytes, bk] bf16 array in WGMMA layout (wgmma's A registers) holding x = 128 + code, rows
  in `value_channel_order`. Each thread reads its codes with two `ldmatrix.x4.trans` (bk = 64) at
  the addresses of `ldmatrix_row_offsets`: the transposed 8x8 b16 load hands it byte pair p of two
  consecutive keys in one register, so the unpacking is 3 shifts and 4 lop3 per 8 values, and
  nothing goes through shared memory."""
  pg = plgpu()
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  if code_bytes != 64 or bk % 32:
    raise ValueError(f"register value tiles need code_bytes 64 and bk a multiple of 32, got {code_bytes}, {bk}")
  code_t = pg.RefType(tiled(code_bytes, jnp.uint8))

  @pg.inline_mgpu(arg_types=(code_t,),
                  return_type=pg.ShapeDtypeStruct((2 * code_bytes, bk), jnp.bfloat16, layout=pg.Layout.WGMMA))
  def load(ctx, codes_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    k = lambda v: arith.constant(i32, v)  # noqa: E731
    tid = mu.thread_idx()
    lane, warp = arith.andi(tid, k(31)), arith.andi(arith.shrui(tid, k(5)), k(3))
    key = lane   # 8 (lane // 8) + lane % 8: the row this lane supplies (ldmatrix_row_offsets)
    chunk = arith.xori(warp, arith.andi(arith.shrui(key, k(1)), k(3)))
    off = arith.addi(arith.muli(key, k(code_bytes)), arith.muli(chunk, k(16)))
    base = arith.addi(llvm.ptrtoint(i32, mu.memref_ptr(codes_ref)), off)
    out = np.empty(fa.WGMMA_LAYOUT.registers_shape((2 * code_bytes, bk)), dtype=object)
    quad = llvm.StructType.get_literal([i32] * 4)
    for x in range(bk // 32):
      loaded = llvm.inline_asm(quad, [arith.addi(base, k(32 * code_bytes * x))],
                               "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4];",
                               "=r,=r,=r,=r,r", has_side_effects=True)
      for i in range(4):
        g = 4 * x + i   # keys 8 g ..: A column tile g
        res = llvm.inline_asm(quad, [llvm.extractvalue(i32, loaded, [i])], VALUE_UNPACK_ASM, "=r,=r,=r,=r,r")
        for slot, (mt, rh) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
          out[(mt, g, 0, 0, rh, 0, 0, 0, 0)] = mu.bitcast(llvm.extractvalue(i32, res, [slot]), pair)
    return mgpu.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return load


class _IntOps:
  """Address arithmetic on Python ints: the numpy model that tests check (`query_tile_offsets`)
  runs the same formula (`_query_addresses`) that the inline kernel emits through `_ir_ops`."""
  add = staticmethod(lambda a, b: a + b)
  mul = staticmethod(lambda a, b: a * b)
  shl = staticmethod(lambda a, b: a << b)
  shr = staticmethod(lambda a, b: a >> b)
  and_ = staticmethod(lambda a, b: a & b)
  xor = staticmethod(lambda a, b: a ^ b)
  lt = staticmethod(lambda a, b: a < b)
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


def _query_addresses(o, tid, i: int, rows: int):
  """`permute_queries_fn`'s addresses for thread tid (0-127) and pass i: (real row?, the 4 source
  byte offsets in the raw tile, the destination byte offset in the swizzled tile)."""
  col_tile, r0 = o.and_(tid, 15), o.shr(tid, 4)
  j, p = o.shr(col_tile, 2), o.and_(col_tile, 3)
  base = o.add(o.add(o.shl(o.shr(p, 1), 6), o.shl(j, 4)), o.shl(o.and_(p, 1), 1))
  r = o.add(r0, 8 * i)
  real = o.lt(r, rows)
  r_src = o.select(real, r, 0)
  src = [o.shl(o.add(o.mul(r_src, 128), o.add(base, 4 * w)), 1) for w in range(4)]
  r7 = o.and_(r, 7)
  tile = o.add(o.shl(o.shr(r, 3), 1), o.shr(col_tile, 3))
  chunk = o.xor(o.and_(col_tile, 7), r7)
  return real, src, o.add(o.add(o.mul(tile, 1024), o.mul(r7, 128)), o.shl(chunk, 4))


def query_tile_offsets(rows: int, n_q: int) -> tuple[np.ndarray, np.ndarray]:
  """The addresses `permute_queries_fn` uses, as numpy (for tests): for thread t and pass i (row
  r = 8 i + t // 16, column tile J = t % 16 of 8 wgmma K indices), src[t, i, w] = the byte offset in
  the raw [rows, 128] bf16 query tile of the w-th pair of channels those 8 indices hold
  (`key_channel_order`: channels b, b+1, b+4, b+5, .. b+13) or -1 past the real rows, and
  dst[t, i] = the byte offset of those 16 bytes in the [n_q, 128] tile as TMA writes it (8 x 64
  tiles of 1 KB, 128-byte swizzle: 16-byte chunk J % 8 ^ r % 8)."""
  src = np.full((128, n_q // 8, 4), -1, np.int64)
  dst = np.empty((128, n_q // 8), np.int64)
  for t, i in np.ndindex(128, n_q // 8):
    real, offs, dst[t, i] = _query_addresses(_IntOps, t, i, rows)
    if real:
      src[t, i] = offs
  return src, dst


def permute_queries_fn(rows: int, n_q: int):
  """inline Mosaic GPU: raw queries smem [rows, 128] bf16 (one kv head's rows as TMA brought them
  from [B, 1, H, D]) -> the wgmma B tile [n_q, 128] (128-byte swizzle) with its columns in
  `key_channel_order` and rows past `rows` zero: 4 shared loads and one 16-byte store per thread
  and 8 rows (addresses: `query_tile_offsets`). The caller fences (commit_smem) before the wgmma."""
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
      real, offs, dst = _query_addresses(o, tid, i, rows)
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
