"""The int4 register tiles of the Hopper decode kernel (`decode_quant_mgpu_kernel.py`), inline Mosaic GPU:
int4 codes straight into wgmma's A registers by the "magic number" of fast int4 GEMMs (Kim et al.
2022, Sec. 4): lop3 ORs a nibble into the mantissa of 128.0 (x = 128 + c exactly).

  * Keys (`int4_dequant_regs_fn`): two `ldmatrix.x4` per thread put the codes in the 8-bit WGMMA
    layout; 4 code bytes of a row (bit planes over channel halves, as `quant.py` packs them) -> 8
    values c * s + z (sub + fma, one rounding), columns in a fixed permutation (`key_channel_order`)
    that the queries take too.
  * Values (`int4_value_regs_fn`): V^T read by `ldmatrix.trans`, which puts two keys' bytes in one
    register, -> x = 128 + c with 3 shifts and 4 lop3 per 8 values, rows in `value_channel_order`
    (O^T's rows come out in it).
  * Code tiles as TMA writes them (`code_offset`): 64-byte rows with a 64-byte swizzle, or the wide
    tile, 128-byte rows of two keys with a 128-byte swizzle. The numpy models of the ldmatrix
    addresses (`key_ldmatrix_offsets`, `ldmatrix_row_offsets`) run the same formulas.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lcinfer.pallas_kernels.mgpu_inline import _IntOps, _ir_ops, lane_and_warp, plgpu, tiled


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


def code_offset(o, key, byte, swizzle: int, code_bytes: int = 64):
  """The byte offset of code byte `byte` of key `key` in a code tile as TMA writes it (o: `_IntOps`
  or `_ir_ops()`): the keys' rows are contiguous (linear offset key * code_bytes + byte), and the
  swizzle XORs the 16-byte chunk index (bits 4..) with the bits from 7 up, 2 of them for a 64-byte
  swizzle, 3 for a 128-byte one (CUDA's tensor-map swizzles). 128: the wide tile, whose 128-byte TMA
  rows hold two keys each."""
  if swizzle not in (64, 128):
    raise ValueError(f"code tiles have a 64- or 128-byte swizzle, got {swizzle}")
  lin = o.add(o.mul(key, code_bytes), byte)
  return o.xor(lin, o.shl(o.and_(o.shr(lin, 7), swizzle // 16 - 1), 4))


def _key_ldmatrix_offsets(o, warp, lane, swizzle: int, code_bytes: int = 64):
  """The byte offsets (in a code tile as TMA writes it) of the 16-byte rows that `lane` of `warp`
  supplies to the key tile's two `ldmatrix.x4` (not transposed): load x, matrix i = lane // 8 is the
  8x16-byte block of keys 16 warp + 8 (i % 2) .. + 7 and code bytes 16 (2 x + i // 2) .. + 15, so
  that its fragment (row lane // 4, word lane % 4) is the 8-bit WGMMA layout's register (j, rh) =
  (2 x + i // 2, i % 2). Load 1's chunks are load 0's plus 32 bytes: bit 5 of the offset, which no
  swizzle moves (XOR 32)."""
  i = o.shr(lane, 3)
  key = o.add(o.add(o.mul(warp, 16), o.shl(o.and_(i, 1), 3)), o.and_(lane, 7))
  off0 = code_offset(o, key, o.shl(o.shr(i, 1), 4), swizzle, code_bytes)
  return off0, o.xor(off0, 32)


def key_ldmatrix_offsets(swizzle: int, code_bytes: int = 64) -> np.ndarray:
  """offsets[x, w, lane] of `_key_ldmatrix_offsets`, as numpy (for tests)."""
  out = np.empty((2, 4, 32), np.int64)
  for w, lane in np.ndindex(4, 32):
    out[:, w, lane] = _key_ldmatrix_offsets(_IntOps, w, lane, swizzle, code_bytes)
  return out


def int4_dequant_regs_fn(code_bytes: int, bk: int, swizzle: int = 64):
  """inline Mosaic GPU: codes smem [bk, code_bytes] uint8 (swizzle 64) or the same keys as
  [bk / 2, 2 code_bytes] rows (swizzle 128, the wide tile) and the per-channel (s, s, z, z) halves
  -> x = c * s + z as a [bk, 2 code_bytes] bf16 array in WGMMA layout (wgmma's A registers), its
  columns in `key_channel_order`: no shared-memory tile and no stores. The codes come in the 8-bit
  WGMMA layout by two `ldmatrix.x4` per thread (bk = 64; addresses `key_ldmatrix_offsets`): its
  8x8 b16 fragments are that layout's 8x16-byte register blocks."""
  pg = plgpu()
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  if code_bytes != 64 or bk != 64:
    raise ValueError(f"register key tiles need head_dim 128 (code_bytes 64) and bk 64, got {code_bytes}, {bk}")
  code_t = pg.RefType(tiled(swizzle, jnp.uint8))
  scale_types = (pg.Layout.WGMMA_8BIT.reduce(0),) * 4

  def codes_in_registers(codes_ref):
    i32 = ir.IntegerType.get_signless(32)
    o, layout = _ir_ops(), fa.WGMMA_LAYOUT_8BIT
    lane, warp = lane_and_warp(o)
    base = llvm.ptrtoint(i32, mu.memref_ptr(codes_ref))
    regs = np.empty(layout.registers_shape((bk, code_bytes)), dtype=object)
    quad = llvm.StructType.get_literal([i32] * 4)
    for x, off in enumerate(_key_ldmatrix_offsets(o, warp, lane, swizzle, code_bytes)):
      loaded = llvm.inline_asm(quad, [arith.addi(base, off)],
                               "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, [$4];",
                               "=r,=r,=r,=r,r", has_side_effects=True)
      for i in range(4):
        word = llvm.extractvalue(i32, loaded, [i])
        regs[(0, 2 * x + i // 2, 0, 0, i % 2, 0, 0, 0, 0)] = mu.bitcast(
            word, layout.registers_element_type(ir.IntegerType.get_signless(8)))
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=False)

  @pg.inline_mgpu(arg_types=(code_t, scale_types),
                  return_type=pg.ShapeDtypeStruct((bk, 2 * code_bytes), jnp.bfloat16, layout=pg.Layout.WGMMA))
  def dequant(ctx, codes_ref, scales):
    del ctx
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    codes = codes_in_registers(codes_ref)
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


def ldmatrix_row_offsets(code_bytes: int = 64, swizzle: int = 64) -> np.ndarray:
  """offsets[w, lane]: the byte offset (in a code tile as TMA writes it, `code_offset`) of the
  16-byte row that lane supplies to warp w's first `ldmatrix.x4.trans`: matrix lane // 8 (keys
  8 (lane // 8) ..), row lane % 8, the warp's 16-byte chunk w of that key's codes. The next x4 is
  32 keys (2048 bytes) on, where both swizzles repeat."""
  offsets = np.empty((4, 32), np.int64)
  for w, lane in np.ndindex(4, 32):
    offsets[w, lane] = code_offset(_IntOps, 8 * (lane // 8) + lane % 8, 16 * w, swizzle, code_bytes)
  return offsets


def int4_value_regs_fn(code_bytes: int, bk: int, swizzle: int = 64):
  """inline Mosaic GPU: value codes smem [bk, code_bytes] uint8 (TMA, 64-byte swizzle; or 128, the
  wide tile of two keys per row, `code_offset`) -> V^T as a
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
  code_t = pg.RefType(tiled(swizzle, jnp.uint8))

  @pg.inline_mgpu(arg_types=(code_t,),
                  return_type=pg.ShapeDtypeStruct((2 * code_bytes, bk), jnp.bfloat16, layout=pg.Layout.WGMMA))
  def load(ctx, codes_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    o = _ir_ops()
    lane, warp = lane_and_warp(o)
    # lane = 8 (lane // 8) + lane % 8: the key this lane supplies, its chunk w (ldmatrix_row_offsets)
    off = code_offset(o, lane, o.mul(warp, 16), swizzle, code_bytes)
    base = arith.addi(llvm.ptrtoint(i32, mu.memref_ptr(codes_ref)), off)
    out = np.empty(fa.WGMMA_LAYOUT.registers_shape((2 * code_bytes, bk)), dtype=object)
    quad = llvm.StructType.get_literal([i32] * 4)
    for x in range(bk // 32):
      loaded = llvm.inline_asm(quad, [o.add(base, 32 * code_bytes * x)],
                               "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4];",
                               "=r,=r,=r,=r,r", has_side_effects=True)
      for i in range(4):
        g = 4 * x + i   # keys 8 g ..: A column tile g
        res = llvm.inline_asm(quad, [llvm.extractvalue(i32, loaded, [i])], VALUE_UNPACK_ASM, "=r,=r,=r,=r,r")
        for slot, (mt, rh) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
          out[(mt, g, 0, 0, rh, 0, 0, 0, 0)] = mu.bitcast(llvm.extractvalue(i32, res, [slot]), pair)
    return mgpu.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return load
