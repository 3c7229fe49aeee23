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
  * The residual window runs through `decode.decode_attention` and merges by lse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels.decode import (MAX_ROWS, MIN_BLOCK, SUPPORTED_HEAD_DIMS, _check_args,
                                           _next_pow2, combine_splits, decode_attention, decode_reference,
                                           pick_config)
from lcinfer.pallas_kernels.launch import gpu_device, triton_call
from lcinfer.pallas_kernels.quant import QuantizedTensor, check_quantized, dequantize


def _pieces(qt_bits: int, axis: str, group: int, d: int) -> tuple[tuple[int, int, int, int], ...]:
  """Static (c0, w, r0, shift): channels [c0, c0 + w) = bytes [r0, r0 + w) >> shift."""
  f = 8 // qt_bits
  plane = d // f
  w = plane if axis == "channel" else min(plane, group)
  return tuple((i * plane + r0, w, r0, i * qt_bits) for i in range(f) for r0 in range(0, plane, w))


def _kernel(q_ref, qpos_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, *rest, scale, window,
            block_k, blocks_per_split, num_blocks, k_layout, v_layout, aliased, f32_dots):
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
  q_f32 = [qp.astype(jnp.float32) for qp in q_parts]      # loop-invariant: once per program
  q_sums = [jnp.sum(qf, axis=1) for qf in q_f32]

  def dot(a, b, dims):
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)

  def codes_of(c_ref, layout, piece, start):
    bits, (_, w, r0, shift) = layout[0], piece
    codes = c_ref[pl.ds(start, block_k), pl.ds(r0, w)]
    if shift:
      codes = codes >> shift
    if bits < 8:
      codes = codes & ((1 << bits) - 1)
    return codes.astype(cdt)  # small integers: exact in bf16

  def scales(s_ref, z_ref, layout, piece, start, memo):
    """('token', s [bk], z [bk]) | ('row', s [1, w], z [1, w]) | ('each', s [bk, w], z [bk, w]).
    Pieces of one channel group share their per-token scales: loaded once per block (`memo`)."""
    _, axis, group, _ = layout
    c0, w = piece[:2]
    if axis == "token":           # one scale per key for this channel group
      key, idx, mode = c0 // group, (pl.ds(start, block_k), c0 // group), "token"
    elif group % block_k == 0:    # the block lies in one token group: one row of channel scales
      key, idx, mode = c0, (pl.ds(lax.div(start, group), 1), pl.ds(c0, w)), "row"
    else:                         # each key's group row, gathered (cache-resident)
      key, idx, mode = c0, (lax.div(start + jnp.arange(block_k, dtype=jnp.int32), group), pl.ds(c0, w)), "each"
    if key not in memo:
      memo[key] = (mode, s_ref[idx].astype(jnp.float32), z_ref[idx].astype(jnp.float32))
    return memo[key]

  def body(j, carry):
    start = pl.multiple_of(base + j * block_k, block_k)
    s = None
    k_memo, v_memo = {}, {}
    for qp, qf, q_sum, piece in zip(q_parts, q_f32, q_sums, k_pieces):
      codes = codes_of(kc_ref, k_layout, piece, start)
      mode, sc, zr = scales(ks_ref, kz_ref, k_layout, piece, start, k_memo)
      if mode == "row":    # q . (c * s + z) = (q * s) . c + q . z
        part = dot((qf * sc).astype(cdt), codes, ((1,), (1,))) + jnp.sum(qf * zr, axis=1)[:, None]
      elif mode == "token":  # per key: s_t (q . c_t) + z_t sum(q)
        part = dot(qp, codes, ((1,), (1,))) * sc[None, :] + q_sum[:, None] * zr[None, :]
      else:
        part = dot(qp, (codes.astype(jnp.float32) * sc + zr).astype(cdt), ((1,), (1,)))
      s = part if s is None else s + part
    s = s * qk_scale

    def pv(p):  # p [R, bk] float32 -> p @ V per piece, V's scales applied outside the product
      outs = []
      for piece in v_pieces:
        codes = codes_of(vc_ref, v_layout, piece, start)
        mode, sc, zr = scales(vs_ref, vz_ref, v_layout, piece, start, v_memo)
        if mode == "token":   # sum_t p_t (s_t c_t + z_t) = (p * s) @ c + p . z
          outs.append(dot((p * sc[None, :]).astype(cdt), codes, ((1,), (0,)))
                      + jnp.sum(p * zr[None, :], axis=1)[:, None])
        elif mode == "row":   # per channel: s_c (p @ c) + z_c sum(p)
          outs.append(dot(p.astype(cdt), codes, ((1,), (0,))) * sc + jnp.sum(p, axis=1)[:, None] * zr)
        else:
          outs.append(dot(p.astype(cdt), (codes.astype(jnp.float32) * sc + zr).astype(cdt), ((1,), (0,))))
      return tuple(outs)

    k_pos = pos_ref[pl.ds(start, block_k)]
    mask = (k_pos[None, :] >= 0) & (q_pos[:, None] >= 0) & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
      mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
    return osm.update(carry, s, pv, mask, precision)

  n = jnp.minimum(blocks_per_split, num_blocks - split * blocks_per_split)
  rows = q_ref.shape[0]
  carry = lax.fori_loop(0, n, body, osm.init(rows, tuple(w for _, w, _, _ in v_pieces)))
  outs, lse = osm.finish(carry)
  for (c0, w, _, _), o in zip(v_pieces, outs):
    o_ref[:, pl.ds(c0, w)] = o
  lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("scale", "window", "num_splits", "block_k", "num_warps",
                                             "num_stages", "interpret", "poison"))
def _qdecode(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, *, scale, window, num_splits, block_k, num_warps,
             num_stages, interpret, poison):
  b, t, h, d = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  g = h // kh
  rows = g * t
  r = max(MIN_BLOCK, _next_pow2(rows))
  nb = c // block_k
  bps = pl.cdiv(nb, num_splits)
  num_splits = pl.cdiv(nb, bps)
  q = jnp.transpose(q_BTHD.reshape(b, t, kh, g, d), (0, 2, 3, 1, 4)).reshape(b, kh, rows, d)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, r - rows), (0, 0)))
  qpos = jnp.pad(jnp.tile(q_pos_BT.astype(jnp.int32), (1, g)), ((0, 0), (0, r - rows)), constant_values=-1)

  def whole(x):  # the whole [.., ..] slab of one (batch, kv head)
    return pl.BlockSpec((None, None) + tuple(x.shape[2:]), lambda bi, ki, si: (bi, ki, 0, 0))

  args = [q, qpos, k_q.codes, k_q.scale, k_q.zero, v_q.codes, v_q.scale, v_q.zero, pos_BKC.astype(jnp.int32)]
  in_specs = [pl.BlockSpec((None, None, r, d), lambda bi, ki, si: (bi, ki, 0, 0)),
              pl.BlockSpec((None, r), lambda bi, ki, si: (bi, 0))]
  in_specs += [whole(x) for x in args[2:8]]
  in_specs.append(pl.BlockSpec((None, None, c), lambda bi, ki, si: (bi, ki, 0)))
  out_specs = [pl.BlockSpec((None, None, None, r, d), lambda bi, ki, si: (bi, ki, si, 0, 0)),
               pl.BlockSpec((None, None, None, r), lambda bi, ki, si: (bi, ki, si, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, kh, num_splits, r, d), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, num_splits, r), jnp.float32)]
  lay = lambda qt: (qt.bits, qt.axis, qt.group, _pieces(qt.bits, qt.axis, qt.group, d))  # noqa: E731
  kernel = functools.partial(_kernel, scale=scale, window=window, block_k=block_k, blocks_per_split=bps,
                             num_blocks=nb, k_layout=lay(k_q), v_layout=lay(v_q),
                             aliased=poison is not None, f32_dots=q.dtype == jnp.float32)
  o_part, lse_part = triton_call(kernel, args, grid=(b, kh, num_splits), in_specs=in_specs,
                                 out_specs=out_specs, out_shape=out_shape, num_warps=num_warps,
                                 num_stages=num_stages, interpret=interpret, name="lcinfer_quant_decode",
                                 poison=poison)
  out, lse = combine_splits(o_part, lse_part)
  out = jnp.transpose(out[:, :, :rows].reshape(b, kh, g, t, d), (0, 3, 1, 2, 4)).reshape(b, t, h, d)
  lse = jnp.transpose(lse[:, :, :rows].reshape(b, kh, g, t), (0, 3, 1, 2)).reshape(b, t, h)
  return out.astype(q_BTHD.dtype), lse


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
                               interpret: bool = False, _poison: float | None = None):
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
  if block_k is None:  # the bf16 kernel's block (H100 sweep: int4 at 64 keys beat 128 and 256)
    block_k = bk
  if c % block_k:
    raise dispatch.Unsupported(f"block_k {block_k} does not divide C = {c} (C must be a multiple of 16)")
  if num_splits is None:
    num_splits = max(1, min(splits, c // block_k))
  out = _qdecode(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=float(scale), window=window,
                 num_splits=num_splits, block_k=block_k, num_warps=num_warps or warps,
                 num_stages=num_stages or stages, interpret=bool(interpret), poison=_poison)
  if residual is None:
    return out
  rk, rv, rp = residual
  res = decode_attention(q_BTHD, rk, rv, rp, q_pos_BT, scale=scale, window=window, interpret=interpret,
                         _poison=_poison)
  from lcinfer.attention.base import merge_attention  # the one merge (ARCHITECTURE.md principle 3)
  return merge_attention([out, res])


dispatch.register("quantized_decode_attention", "triton", quantized_decode_attention)
dispatch.register("quantized_decode_attention", "xla", quantized_decode_reference)
