"""Flash-decoding over a quantized KV cache (layouts: `quant.py`), dequantized inside the kernel,
plus an optional full-precision residual window merged by lse (KIVI, Liu et al. 2024: keys
per-channel, values per-token, the last R tokens kept in full precision).

    out_BTHD, lse_BTH = quantized_decode_attention(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=...,
                                                   window=None, residual=None, interpret=False)

k_q, v_q: `quant.QuantizedTensor` of logical shape [B, K, C, D] (bits 8/4/2, axis "token" or
"channel"); residual: (k_BKRD, v_BKRD, pos_BKR) of recent tokens in q's dtype, or None.
Visibility is by position exactly as in `decode.py` (pos -1 = empty slot).

Design (same grid and split-K combine as `decode.py`: programs (B, K, split), G*T query rows share
every block load):
  * Each KV block is read as packed uint8 codes plus its scales: bits/16 of the bf16 bytes.
  * Unpacking uses the bit-plane layout: a channel range [c0, c0 + w) is the byte range
    [r0, r0 + w) shifted by i * bits, so every piece is a static ref slice + shift + mask; the
    logits are the sum over pieces of q[:, piece] . k_piece^T, and the values accumulate per piece
    (w >= 16 for tl.dot: token groups of at least 16 channels).
  * Codes go to the MMA as small integers in q's dtype (exact); the scales are applied outside the
    products where the algebra allows: q . (c s + z) = (q s) . c + q . z for a row of per-channel
    scales, s_t (q . c_t) + z_t sum(q) for per-token scales, and likewise for p @ V. Only a block
    that spans several per-channel token groups dequantizes element-wise (rows gathered).
  * Code -> bf16/f16 without conversion instructions (the "magic number" of fast int4 GEMMs, e.g.
    Kim et al. 2022, "Who says elephants can't run", Sec. 4): a code c OR-ed into the mantissa of
    B = 128 (bf16 0x4300, c < 128) or B = 1024 (f16 0x6400, c < 1024) is exactly the number B + c,
    and B + c - B = c exactly. Compiled, one inline PTX block per plane turns 4 packed bytes into
    4 codes (2 prmt spread the bytes into 16-bit lanes, a shift for planes > 0, 2 lop3 for
    mask | magic, 2 packed subtractions). Interpret mode runs the same arithmetic in jnp. float32
    queries, and 8-bit codes with bf16 queries (c up to 255 does not fit bf16's mantissa), take
    the plain conversion. (ncu on the H100, int4, 128K: the uint8 -> float conversions made 8
    instructions per cached element and the kernel issue-bound at 67.9M instructions.)
  * Per block the other work is on [rows, block_k] tiles whose rows are padded to 16 (G * T = 4
    real rows for Llama-3-8B): log2(e) * scale is folded into q and the per-token scales, the
    scaled P of the pieces of one V channel group is computed once, and the visibility test is one
    comparison per element (`decode.visible_mask`).
  * The residual window runs through `decode.decode_attention` and merges by lse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lcinfer.pallas_kernels import combine, dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels.decode import (MAX_ROWS, MIN_BLOCK, SUPPORTED_HEAD_DIMS, _check_args,
                                           _next_pow2, decode_attention, decode_reference, kv_head_rows,
                                           pick_config, store_real_rows, visible_mask)
from lcinfer.pallas_kernels.launch import gpu_device, triton_call
from lcinfer.pallas_kernels.quant import QuantizedTensor, check_quantized, dequantize


def _pieces(qt_bits: int, axis: str, group: int, d: int) -> tuple[tuple[int, int, int, int], ...]:
  """Static (c0, w, r0, shift): channels [c0, c0 + w) = bytes [r0, r0 + w) >> shift."""
  f = 8 // qt_bits
  plane = d // f
  w = plane if axis == "channel" else min(plane, group)
  return tuple((i * plane + r0, w, r0, i * qt_bits) for i in range(f) for r0 in range(0, plane, w))


# dtype -> (bit pattern of B, B, mantissa bits: codes below 2^bits are exact as B + code)
MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0, 7), jnp.dtype(jnp.float16): (0x6400, 1024.0, 10)}


def unpack_mode(dtype, bits: int, interpret: bool) -> str:
  """How codes become MMA operands: "float" (conversion), "magic" (jnp bit ops) or "asm" (PTX)."""
  magic = MAGIC.get(jnp.dtype(dtype))
  if magic is None or bits > magic[2]:
    return "float"
  return "magic" if interpret else "asm"


def _plane_asm(bits: int, plane: int, magic16: int, kind: str) -> str:
  """PTX for 4 packed uint8 ($2) -> the 4 codes of one bit plane as bf16 / f16 (`kind`), in $0, $1
  (two x2 registers): B + code by mask | magic, then - B (exact)."""
  mask = (1 << bits) - 1
  lines = ["{", ".reg .b32 z, t0, t1;", "mov.b32 z, 0;",
           "prmt.b32 t0, $2, z, 0x4140;",   # bytes 0, 1 -> the low bytes of two 16-bit lanes
           "prmt.b32 t1, $2, z, 0x4342;"]   # bytes 2, 3
  if plane:
    lines += [f"shr.b32 t0, t0, {plane * bits};", f"shr.b32 t1, t1, {plane * bits};"]
  lut = 0xEA  # (a & b) | c
  m32, g32 = mask | (mask << 16), magic16 | (magic16 << 16)
  lines += [f"lop3.b32 $0, t0, {m32}, {g32}, {lut};", f"lop3.b32 $1, t1, {m32}, {g32}, {lut};",
            f"mov.b32 t0, {g32};", f"sub.rn.{kind}x2 $0, $0, t0;", f"sub.rn.{kind}x2 $1, $1, t0;", "}"]
  return "\n".join(lines)


def _unpack_planes(raw, bits: int, mode: str, dtype):
  """uint8 codes [N, w] -> the 8 / bits planes [N, w] of codes, as small integers in `dtype`."""
  f, mask = 8 // bits, (1 << bits) - 1
  magic16, bias, _ = MAGIC.get(jnp.dtype(dtype), (0, 0.0, 0))
  if mode == "asm":
    kind = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f16"
    return tuple(pltriton.elementwise_inline_asm(
        _plane_asm(bits, i, magic16, kind), args=[raw], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(raw.shape, dtype)])[0] for i in range(f))
  planes = []
  for i in range(f):
    c = raw >> (i * bits) if i else raw
    c = c & mask if bits < 8 else c
    if mode == "magic":
      planes.append(lax.bitcast_convert_type(c.astype(jnp.uint16) | jnp.uint16(magic16), dtype) - bias)
    else:
      planes.append(c.astype(dtype))  # small integers: exact
  return tuple(planes)


def _kernel(q_ref, qpos_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, *rest, scale, window,
            block_k, blocks_per_split, num_blocks, k_layout, v_layout, aliased, f32_dots, rows):
  if aliased:
    rest = rest[2:]  # NaN-filled buffers aliased to the outputs; never read
  o_ref, lse_ref = rest
  split = pl.program_id(2)
  q_pos = qpos_ref[...]
  precision = lax.Precision.HIGHEST if f32_dots else None
  cdt = q_ref.dtype
  qk_scale = scale * osm.LOG2E
  base = split * (blocks_per_split * block_k)
  k_pieces, v_pieces = k_layout[3], v_layout[3]
  q_parts = [q_ref[:, pl.ds(c0, w)] for c0, w, _, _ in k_pieces]
  # loop-invariant row sums (base-2 logits); the float32 copies of q are made per block (registers)
  q_sums = [jnp.sum(qp.astype(jnp.float32), axis=1) * qk_scale for qp in q_parts]

  def dot(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)

  def codes_of(c_ref, layout, piece, start, memo):
    """The piece's plane as MMA operand (codes as small integers): the pieces of one byte range share
    one load and unpacking per block (`memo`)."""
    bits, (_, w, r0, shift) = layout[0], piece
    if ("codes", r0) not in memo:
      raw = c_ref[pl.ds(start, block_k), pl.ds(r0, w)]
      memo[("codes", r0)] = _unpack_planes(raw, bits, layout[4], cdt)
    return memo[("codes", r0)][shift // bits]

  def scales(s_ref, z_ref, layout, piece, start, memo):
    """('token', s [bk], z [bk]) | ('row', s [1, w], z [1, w]) | ('each', s [bk, w], z [bk, w]),
    then the memo key. Pieces of one channel group share their per-token scales: loaded once per
    block (`memo`)."""
    _, axis, group, _, _ = layout
    c0, w = piece[:2]
    if axis == "token":           # one scale per key for this channel group
      key, idx, mode = c0 // group, (pl.ds(start, block_k), c0 // group), "token"
    elif group % block_k == 0:    # the block lies in one token group: one row of channel scales
      key, idx, mode = c0, (pl.ds(lax.div(start, group), 1), pl.ds(c0, w)), "row"
    else:                         # each key's group row, gathered (cache-resident)
      key, idx, mode = c0, (lax.div(start + jnp.arange(block_k, dtype=jnp.int32), group), pl.ds(c0, w)), "each"
    if key not in memo:
      memo[key] = (mode, s_ref[idx].astype(jnp.float32), z_ref[idx].astype(jnp.float32), key)
    return memo[key]

  def body(j, carry):
    start = pl.multiple_of(base + j * block_k, block_k)
    s = None
    k_memo, v_memo = {}, {}
    for qp, q_sum, piece in zip(q_parts, q_sums, k_pieces):  # q_sum: scaled
      x = codes_of(kc_ref, k_layout, piece, start, k_memo)
      mode, sc, zr, _ = scales(ks_ref, kz_ref, k_layout, piece, start, k_memo)
      if mode == "row":    # q . (c * s + z) = (q * s) . c + q . z
        qf = qp.astype(jnp.float32)
        part = (dot((qf * (sc * qk_scale)).astype(cdt), x, ((1,), (1,)))
                + jnp.sum(qf * (zr * qk_scale), axis=1)[:, None])
      elif mode == "token":  # per key: s_t (q . c_t) + z_t sum(q)
        part = dot(qp, x, ((1,), (1,))) * (sc * qk_scale)[None, :] + q_sum[:, None] * zr[None, :]
      else:
        part = dot(qp, (x.astype(jnp.float32) * sc + zr).astype(cdt), ((1,), (1,))) * qk_scale
      s = part if s is None else s + part

    def pv(p):  # p [R, bk] float32 -> p @ V per piece, V's scales applied outside the product
      outs = []
      for piece in v_pieces:
        x = codes_of(vc_ref, v_layout, piece, start, v_memo)
        mode, sc, zr, skey = scales(vs_ref, vz_ref, v_layout, piece, start, v_memo)
        if mode == "token":   # sum_t p_t (s_t c_t + z_t) = (p * s) @ c + p . z, per channel group
          key = ("p", skey)
          if key not in v_memo:
            v_memo[key] = ((p * sc[None, :]).astype(cdt), jnp.sum(p * zr[None, :], axis=1)[:, None])
          a, pz = v_memo[key]
          outs.append(dot(a, x, ((1,), (0,))) + pz)
        elif mode == "row":   # per channel: s_c (p @ c) + z_c sum(p)
          outs.append(dot(p.astype(cdt), x, ((1,), (0,))) * sc + jnp.sum(p, axis=1)[:, None] * zr)
        else:
          outs.append(dot(p.astype(cdt), (x.astype(jnp.float32) * sc + zr).astype(cdt), ((1,), (0,))))
      return tuple(outs)

    return osm.update(carry, s, pv, visible_mask(pos_ref[pl.ds(start, block_k)], q_pos, window), precision)

  n = jnp.minimum(blocks_per_split, num_blocks - split * blocks_per_split)
  r = q_ref.shape[0]
  carry = lax.fori_loop(0, n, body, osm.init(r, tuple(w for _, w, _, _ in v_pieces)))
  outs, lse = osm.finish(carry)
  for (c0, w, _, _), o in zip(v_pieces, outs):
    store_real_rows(o_ref.at[:, pl.ds(c0, w)], o, rows)
  lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("scale", "window", "num_splits", "block_k", "num_warps",
                                             "num_stages", "interpret", "poison", "unpack"))
def _qdecode(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, *, scale, window, num_splits, block_k, num_warps,
             num_stages, interpret, poison, unpack):
  b, t, h, d = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  g = h // kh
  rows = g * t
  r = max(MIN_BLOCK, _next_pow2(rows))
  nb = c // block_k
  bps = pl.cdiv(nb, num_splits)
  num_splits = pl.cdiv(nb, bps)
  q, qpos = kv_head_rows(q_BTHD, q_pos_BT, kh, r)

  def whole(x):  # the whole [.., ..] slab of one (batch, kv head)
    return pl.BlockSpec((None, None) + tuple(x.shape[2:]), lambda bi, ki, si: (bi, ki, 0, 0))

  args = [q, qpos, k_q.codes, k_q.scale, k_q.zero, v_q.codes, v_q.scale, v_q.zero, pos_BKC.astype(jnp.int32)]
  in_specs = [pl.BlockSpec((None, None, r, d), lambda bi, ki, si: (bi, ki, 0, 0)),
              pl.BlockSpec((None, r), lambda bi, ki, si: (bi, 0))]
  in_specs += [whole(x) for x in args[2:8]]
  in_specs.append(pl.BlockSpec((None, None, c), lambda bi, ki, si: (bi, ki, 0)))
  out_specs = [pl.BlockSpec((None, None, None, r, d), lambda bi, ki, si: (bi, ki, si, 0, 0)),
               pl.BlockSpec((None, None, None, r), lambda bi, ki, si: (bi, ki, si, 0))]
  s_alloc = combine.allocated_splits(num_splits, t, g, d)   # padded for the combination kernel
  out_shape = [jax.ShapeDtypeStruct((b, kh, s_alloc, r, d), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, s_alloc, r), jnp.float32)]

  def lay(qt):
    mode = unpack or unpack_mode(q.dtype, qt.bits, interpret)
    return (qt.bits, qt.axis, qt.group, _pieces(qt.bits, qt.axis, qt.group, d), mode)
  kernel = functools.partial(_kernel, scale=scale, window=window, block_k=block_k, blocks_per_split=bps,
                             num_blocks=nb, k_layout=lay(k_q), v_layout=lay(v_q), rows=rows,
                             aliased=poison is not None, f32_dots=q.dtype == jnp.float32)
  o_part, lse_part = triton_call(kernel, args, grid=(b, kh, num_splits), in_specs=in_specs,
                                 out_specs=out_specs, out_shape=out_shape, num_warps=num_warps,
                                 num_stages=num_stages, interpret=interpret, name="lcinfer_quant_decode",
                                 poison=poison)
  return combine.finish_rows(o_part, lse_part, splits=num_splits, t=t, g=g, out_dtype=q_BTHD.dtype,
                             interpret=interpret)


def _check(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale, window, residual):
  if not isinstance(k_q, QuantizedTensor) or not isinstance(v_q, QuantizedTensor):
    raise ValueError("k_q and v_q must be lcinfer.pallas_kernels.quant.QuantizedTensor "
                     "(quant.quantize makes one)")
  ks, vs = check_quantized(k_q, "k_q"), check_quantized(v_q, "v_q")
  if ks != vs:
    raise ValueError(f"k_q and v_q must have the same logical shape, got {ks} and {vs}")
  shape = jax.ShapeDtypeStruct(ks, q_BTHD.dtype)  # the checks of the unquantized kernel
  _check_args(q_BTHD, shape, shape, pos_BKC, q_pos_BT, scale, window, None, None)
  if residual is not None:
    if not (isinstance(residual, tuple) and len(residual) == 3):
      raise ValueError("residual must be a (k_BKRD, v_BKRD, pos_BKR) tuple or None")
    rk, rv, rp = residual
    _check_args(q_BTHD, rk, rv, rp, q_pos_BT, scale, window, None, None)


def quantized_decode_reference(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, *, scale, window=None, residual=None,
                               interpret=False, **unused):
  """Float32 oracle: dequantize, concatenate the residual window along the cache axis, attend."""
  del interpret, unused
  _check(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale, window, residual)
  k, v, pos = dequantize(k_q), dequantize(v_q), pos_BKC
  if residual is not None:
    rk, rv, rp = residual
    k = jnp.concatenate([k, rk.astype(jnp.float32)], 2)
    v = jnp.concatenate([v, rv.astype(jnp.float32)], 2)
    pos = jnp.concatenate([pos, rp.astype(pos.dtype)], 2)
  return decode_reference(q_BTHD.astype(jnp.float32), k, v, pos, q_pos_BT, scale=scale, window=window,
                          out_dtype=q_BTHD.dtype)


def quantized_decode_attention(q_BTHD, k_q: QuantizedTensor, v_q: QuantizedTensor, pos_BKC, q_pos_BT, *,
                               scale: float, window: int | None = None, residual=None,
                               num_splits: int | None = None, block_k: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None,
                               interpret: bool = False, _poison: float | None = None,
                               _unpack: str | None = None):
  """Flash-decoding over quantized K/V (+ residual window). Returns (out [B, T, H, D] in q's dtype,
  lse [B, T, H] float32). ValueError for malformed calls; `dispatch.Unsupported` for valid calls
  the kernel does not cover (head_dim, token groups < 16 channels, C not a multiple of 16, rows)."""
  _check(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale, window, residual)
  b, t, h, d = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  if d not in SUPPORTED_HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {d} is not supported by the quantized flash-decoding kernel "
                               f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  for name, qt in (("k_q", k_q), ("v_q", v_q)):
    if min(w for _, w, _, _ in _pieces(qt.bits, qt.axis, qt.group, d)) < MIN_BLOCK:
      raise dispatch.Unsupported(f"{name}: token groups of {qt.group} channels are narrower than a "
                                 f"{MIN_BLOCK}-wide MMA operand")
  if t == 0 or c == 0 or b == 0:
    raise dispatch.Unsupported(f"empty input (B={b}, T={t}, C={c})")
  if (h // kh) * t > MAX_ROWS:
    raise dispatch.Unsupported(f"G*T = {(h // kh) * t} query rows per kv head exceeds {MAX_ROWS}")
  dev = gpu_device()
  if not interpret and dev is None:
    raise dispatch.Unsupported("the quantized flash-decoding kernel needs a CUDA GPU; pass "
                               "interpret=True to run it on CPU")
  splits, bk, warps, stages = pick_config(dev, b, kh, c, d)
  # H100 probes, int4 at 128K (K = 8): 64-key blocks beat 32 / 128 / 256; 4x the bf16 kernel's
  # splits (about 8 programs per SM) and 3 stages read 0.17-0.18 ms against 0.22 with its config,
  # but timings of this kernel moved up to 1.5x between runs (benchmarks/NOTES.md)
  splits, stages = splits * 4, 3
  if block_k is None:
    block_k = bk
  if c % block_k:
    raise dispatch.Unsupported(f"block_k {block_k} does not divide C = {c} (C must be a multiple of 16)")
  if num_splits is None:
    num_splits = max(1, min(splits, c // block_k))
  out = _qdecode(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=float(scale), window=window,
                 num_splits=num_splits, block_k=block_k, num_warps=num_warps or warps,
                 num_stages=num_stages or stages, interpret=bool(interpret), poison=_poison,
                 unpack=_unpack)
  return merge_residual(out, q_BTHD, q_pos_BT, residual, scale=scale, window=window, interpret=interpret,
                        poison=_poison)


def merge_residual(out, q_BTHD, q_pos_BT, residual, *, scale, window, interpret=False, poison=None,
                   decode=decode_attention):
  """(out, lse) of the quantized part merged by lse with flash-decoding (`decode`: the GPU kernel,
  or the TPU one) over the full-precision residual window (k_BKRD, v_BKRD, pos_BKR); `out` itself
  when residual is None."""
  if residual is None:
    return out
  rk, rv, rp = residual
  res = decode(q_BTHD, rk, rv, rp, q_pos_BT, scale=scale, window=window, interpret=interpret,
               _poison=poison)
  from lcinfer.attention.base import merge_attention  # the one merge (ARCHITECTURE.md principle 3)
  return merge_attention([out, res])


dispatch.register("quantized_decode_attention", "triton", quantized_decode_attention)
dispatch.register("quantized_decode_attention", "xla", quantized_decode_reference)
