"""Flash-decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference") as
a Pallas kernel for GPUs, Triton lowering, plus its pure-jnp float32 oracle.

    out_BTHD, lse_BTH = decode_attention(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale=d ** -0.5,
                                         window=None, num_splits=None, block_k=None, interpret=False)

A few queries (T = 1..8 new tokens per row) attend over a long cache in lcinfer's layout
(`lcinfer.kv.cache`: k, v [B, K, C, D], pos [B, K, C] int32 with -1 = empty slot). Masks come from
positions only (never slot order), as `lcinfer.attention.base.visible` says:
    key at pos p is visible to a query at q  iff  p >= 0, q >= 0, p <= q and (window: q - p < window).

Design:
  * Split-K over the sequence: grid (B, K, num_splits). One program owns one kv head of one row and
    one contiguous split of the cache, and walks it in blocks of block_k with an online softmax
    (float32 statistics, exp2 with log2(e) folded into the scale).
  * GQA without repeats: the G = H / K query heads of a kv head and the T queries form G*T rows that
    share every K/V block load (one [R, D] x [D, block_k] dot, R = G*T padded up to a power of two
    >= 16 for tl.dot; padded rows have position -1, so they see nothing and are dropped).
  * Each split writes a partial (out, lse); the splits are combined exactly by lse (empty splits
    have lse = -inf and weight 0; rows that see nothing give out 0, lse -inf): by one Pallas kernel
    (`combine.py`) for one query with G a power of two, else in plain jnp (`combine.combine_splits`).
  * block_k divides the capacity C when C is a multiple of 16 (the default picks it so), and the
    last split takes the remaining blocks: the cache is read in place, never copied. Only other
    capacities are padded in the wrapper (pos = -1), which copies the cache.
  * No block skipping: slots may be in any order (a press may reorder them), so every block is read.
    Decode is bound by reading the cache once; that is what the kernel does.
Compile params use `jax.experimental.pallas.triton.CompilerParams` (Triton lowering).
`interpret=True` runs the same kernel on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels import combine
from lcinfer.pallas_kernels.launch import gpu_device, triton_call
from lcinfer.pallas_kernels.reference import check_qkv

SUPPORTED_HEAD_DIMS = (64, 128)
MIN_BLOCK = 16   # tl.dot needs M, N, K >= 16
MAX_ROWS = 128   # G * T rows per program (beyond that: fall back)


def _next_pow2(n: int) -> int:
  return 1 << (max(1, n) - 1).bit_length()


def _check_args(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale, window, num_splits, block_k):
  """ValueError for malformed calls (wrong for every implementation)."""
  for name, x, nd in (("pos", pos_BKC, 3), ("q_pos", q_pos_BT, 2)):
    if getattr(x, "ndim", None) != nd:
      raise ValueError(f"{name} must be a {nd}-d array, got shape {getattr(x, 'shape', None)}")
  b, t, h, d, c, kh = check_qkv(q_BTHD, k_BKCD, v_BKCD, kv_layout="BKCD")
  if pos_BKC.shape != (b, kh, c):
    raise ValueError(f"pos must be [B, K, C] = {(b, kh, c)}, got {pos_BKC.shape}")
  if q_pos_BT.shape != (b, t):
    raise ValueError(f"q_pos must be [B, T] = {(b, t)}, got {q_pos_BT.shape}")
  for name, x in (("pos", pos_BKC), ("q_pos", q_pos_BT)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array, got {x.dtype}")
  if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
    raise ValueError(f"window must be a positive int or None, got {window!r}")
  _check_knobs(num_splits, block_k)
  if not isinstance(scale, (int, float)) or isinstance(scale, bool):
    raise ValueError(f"scale must be a Python float, got {scale!r}")


def _check_knobs(num_splits, block_k):
  """ValueError for a malformed num_splits / block_k (None: the kernel's default)."""
  if num_splits is not None and (not isinstance(num_splits, int) or num_splits <= 0):
    raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
  if block_k is not None and (not isinstance(block_k, int) or block_k < MIN_BLOCK or block_k & (block_k - 1)):
    raise ValueError(f"block_k must be a power of two >= {MIN_BLOCK} (Triton tile), got {block_k!r}")


def decode_reference(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, *, scale, window=None,
                     num_splits=None, block_k=None, interpret=False, out_dtype=None):
  """Float32 oracle (plain jnp, HIGHEST precision): (out [B, T, H, D] in out_dtype or q's dtype,
  lse [B, T, H] float32, -inf where a query sees nothing, out 0 there). `num_splits`, `block_k`
  and `interpret` are accepted and ignored (dispatcher signature)."""
  del interpret
  _check_args(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale, window, num_splits, block_k)
  b, t, h, d = q_BTHD.shape
  kh = k_BKCD.shape[1]
  q = q_BTHD.astype(jnp.float32).reshape(b, t, kh, h // kh, d)
  k, v = k_BKCD.astype(jnp.float32), v_BKCD.astype(jnp.float32)
  hi = lax.Precision.HIGHEST
  s = jnp.einsum("btkgd,bkcd->bkgtc", q, k, precision=hi) * scale
  qp = q_pos_BT.astype(jnp.int32)[:, None, None, :, None]
  kp = pos_BKC.astype(jnp.int32)[:, :, None, None, :]
  ok = (kp >= 0) & (qp >= 0) & (kp <= qp)
  if window is not None:
    ok = ok & (qp - kp < window)
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  den = jnp.sum(e, axis=-1)
  seen = den > 0
  den_safe = jnp.where(seen, den, 1.0)
  out = jnp.einsum("bkgtc,bkcd->btkgd", e / den_safe[..., None], v, precision=hi)
  lse = jnp.where(seen, m[..., 0] + jnp.log(den_safe), -jnp.inf)  # [b, k, g, t]
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
  return out.reshape(b, t, h, d).astype(out_dtype or q_BTHD.dtype), lse


# -- kernel ---------------------------------------------------------------------------------------
def visible_mask(k_pos, q_pos, window):
  """[R, N] bool: key positions k_pos [N] visible to query rows q_pos [R] (module docstring), one
  comparison per element: empty slots (-1) get position int32 max, and a row with q_pos -1 sees
  none."""
  k_pos = jnp.where(k_pos >= 0, k_pos, jnp.iinfo(jnp.int32).max)
  mask = k_pos[None, :] <= q_pos[:, None]
  if window is not None:
    mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
  return mask


def store_real_rows(o_ref, o, rows: int):
  """o [R, w] into o_ref, rows >= `rows` (padding up to the dot's 16) not written: the combine
  reads only the real rows."""
  real = lax.broadcasted_iota(jnp.int32, (o.shape[0], 1), 0) < rows
  pltriton.store(o_ref, o, mask=jnp.broadcast_to(real, o.shape))


def _kernel(q_ref, qpos_ref, k_ref, v_ref, pos_ref, *rest, scale, window, block_k, blocks_per_split,
            num_blocks, aliased, f32_dots, rows):
  if aliased:
    rest = rest[2:]  # NaN-filled buffers aliased to the outputs; never read
  o_ref, lse_ref = rest
  split = pl.program_id(2)
  q = q_ref[...]                 # [R, D]
  q_pos = qpos_ref[...]          # [R] int32 (-1: padded row)
  precision = lax.Precision.HIGHEST if f32_dots else None
  qk_scale = scale * osm.LOG2E
  base = split * (blocks_per_split * block_k)

  def body(j, carry):
    start = pl.multiple_of(base + j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    mask = visible_mask(pos_ref[pl.ds(start, block_k)], q_pos, window)
    return osm.update(carry, osm.logits(q, k, qk_scale, precision), v, mask, precision)  # [R, bk]

  n = jnp.minimum(blocks_per_split, num_blocks - split * blocks_per_split)  # the last split may be short
  carry = lax.fori_loop(0, n, body, osm.init(*q.shape))
  out, lse_ref[...] = osm.finish(carry)
  store_real_rows(o_ref, out, rows)


def kv_head_rows(q_BTHD, q_pos_BT, kh: int, n_rows: int):
  """Queries of one kv head as the rows of one tile: row g * T + t is query head kh * G + g at query
  t. -> (q [B, K, n_rows, D], q_pos [B, n_rows] int32), rows past G * T zero with position -1
  (they see nothing)."""
  b, t, h, d = q_BTHD.shape
  g = h // kh
  q = jnp.transpose(q_BTHD.reshape(b, t, kh, g, d), (0, 2, 3, 1, 4)).reshape(b, kh, g * t, d)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, n_rows - g * t), (0, 0)))
  qpos = jnp.pad(jnp.tile(q_pos_BT.astype(jnp.int32), (1, g)), ((0, 0), (0, n_rows - g * t)),
                 constant_values=-1)
  return q, qpos


@functools.partial(jax.jit, static_argnames=("scale", "window", "num_splits", "block_k", "num_warps",
                                             "num_stages", "interpret", "poison"))
def _decode(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, *, scale, window, num_splits, block_k,
            num_warps, num_stages, interpret, poison):
  b, t, h, d = q_BTHD.shape
  kh, c = k_BKCD.shape[1], k_BKCD.shape[2]
  g = h // kh
  rows = g * t
  r = max(MIN_BLOCK, _next_pow2(rows))
  cp = pl.cdiv(c, block_k) * block_k   # == c whenever block_k divides C (the wrapper makes sure)
  nb = cp // block_k
  bps = pl.cdiv(nb, num_splits)          # blocks per split; the last split takes the remainder
  num_splits = pl.cdiv(nb, bps)          # no empty splits
  q, qpos = kv_head_rows(q_BTHD, q_pos_BT, kh, r)                    # [B, K, R, D], [B, R]
  k, v, pos = k_BKCD, v_BKCD, pos_BKC.astype(jnp.int32)
  if cp != c:  # a copy of the whole cache: only for capacities that are not a multiple of 16
    k = jnp.pad(k, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, 0), (0, cp - c)), constant_values=-1)

  q_spec = pl.BlockSpec((None, None, r, d), lambda bi, ki, si: (bi, ki, 0, 0))
  qpos_spec = pl.BlockSpec((None, r), lambda bi, ki, si: (bi, 0))
  kv_spec = pl.BlockSpec((None, None, cp, d), lambda bi, ki, si: (bi, ki, 0, 0))
  pos_spec = pl.BlockSpec((None, None, cp), lambda bi, ki, si: (bi, ki, 0))
  o_spec = pl.BlockSpec((None, None, None, r, d), lambda bi, ki, si: (bi, ki, si, 0, 0))
  lse_spec = pl.BlockSpec((None, None, None, r), lambda bi, ki, si: (bi, ki, si, 0))
  s_alloc = combine.allocated_splits(num_splits, t, g, d)   # padded for the combination kernel
  out_shape = [jax.ShapeDtypeStruct((b, kh, s_alloc, r, d), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, s_alloc, r), jnp.float32)]
  args = [q, qpos, k, v, pos]
  in_specs = [q_spec, qpos_spec, kv_spec, kv_spec, pos_spec]
  kernel = functools.partial(_kernel, scale=scale, window=window, block_k=block_k,
                             blocks_per_split=bps, num_blocks=nb, aliased=poison is not None,
                             f32_dots=q.dtype == jnp.float32, rows=rows)
  # poison (testing hook): the partial outputs start poisoned, so unwritten elements reach the result
  o_part, lse_part = triton_call(kernel, args, grid=(b, kh, num_splits), in_specs=in_specs,
                                 out_specs=[o_spec, lse_spec], out_shape=out_shape, num_warps=num_warps,
                                 num_stages=num_stages, interpret=interpret, name="lcinfer_flash_decode",
                                 poison=poison)
  return combine.finish_rows(o_part, lse_part, splits=num_splits, t=t, g=g, out_dtype=q_BTHD.dtype,
                             interpret=interpret)


def pick_config(dev, b: int, kh: int, c: int, d: int) -> tuple[int, int, int, int]:
  """(num_splits, block_k, num_warps, num_stages): about two (B, K, split) programs per SM, the
  split count a power of two (even splits of a power-of-two cache), each split at least one block.
  H100 sweep at C = 128K, B = 1, K = 8 (benchmarks/kernels.py --tune, 2026-11-22): 32 splits of
  block 64, 4 warps, 2 stages was the best of 18 (1751 GB/s; 33 splits: 1573 GB/s)."""
  block_k = 64 if d >= 128 else 128
  block_k = max(MIN_BLOCK, min(block_k, _next_pow2(c)))
  while block_k > MIN_BLOCK and c % block_k:  # a block that divides C: no padded copy of the cache
    block_k //= 2
  sms = getattr(dev, "core_count", None) or 132
  n_blocks = pl.cdiv(c, block_k)
  want = max(1, (2 * sms) // (b * kh))
  splits = max(1, min(n_blocks, 1 << (want.bit_length() - 1)))
  return splits, block_k, 4, 2


def decode_attention(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, *, scale: float,
                     window: int | None = None, num_splits: int | None = None,
                     block_k: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, interpret: bool = False,
                     _poison: float | None = None):
  """Flash-decoding. Returns (out [B, T, H, D] in q's dtype, lse [B, T, H] float32).

  Raises ValueError for malformed calls and `dispatch.Unsupported` for valid calls the kernel
  does not cover (head_dim not 64/128, G*T > 128 rows, empty cache, no GPU without interpret).
  """
  _check_args(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale, window, num_splits, block_k)
  b, t, h, d = q_BTHD.shape
  kh, c = k_BKCD.shape[1], k_BKCD.shape[2]
  if d not in SUPPORTED_HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {d} is not supported by the flash-decoding kernel "
                               f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  if t == 0 or c == 0 or b == 0:
    raise dispatch.Unsupported(f"empty input (B={b}, T={t}, C={c})")
  if (h // kh) * t > MAX_ROWS:
    raise dispatch.Unsupported(f"G*T = {(h // kh) * t} query rows per kv head exceeds {MAX_ROWS}; "
                               "use a prefill kernel for long query chunks")
  dev = gpu_device()
  if not interpret and dev is None:
    raise dispatch.Unsupported("the flash-decoding kernel needs a CUDA GPU; pass interpret=True to "
                               "run it on CPU")
  splits, bk, warps, stages = pick_config(dev, b, kh, c, d)
  block_k = bk if block_k is None else block_k
  if num_splits is None:
    num_splits = max(1, min(splits, pl.cdiv(c, block_k)))
  return _decode(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale=float(scale), window=window,
                 num_splits=num_splits, block_k=block_k, num_warps=num_warps or warps,
                 num_stages=num_stages or stages, interpret=bool(interpret), poison=_poison)


dispatch.register("decode_attention", "triton", decode_attention)
dispatch.register("decode_attention", "xla", decode_reference)
