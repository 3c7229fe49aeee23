"""Flash-attention forward as a Pallas kernel for GPUs, Triton lowering (FlashAttention-2, Dao 2023,
Algorithm 1: online softmax over KV blocks, one program per (query block, batch, query head)).

    out_BTHD, lse_BTH = flash_attention(q_BTHD, k_BSKD, v_BSKD, scale=d ** -0.5, causal=True,
                                        window=None, q_segment_ids=None, kv_segment_ids=None,
                                        kv_offset=0, q_lengths=None, kv_lengths=None,
                                        block_q=None, block_k=None, interpret=False)

Masking follows `reference.py` exactly (index based: query i at absolute position kv_offset + i,
key j at j). Design:
  * GQA without copying K/V: the K/V BlockSpec index_map picks kv head h // G for query head h.
  * Causal and sliding window skip whole KV blocks: the loops run over [lo, hi) computed from
    the query block, so blocks above the diagonal or left of the window are never loaded; the
    interior blocks (fully visible to the whole query block) run in their own loop without masks.
  * Logits and softmax statistics in float32 (exp2 with log2(e) folded into the scale); operands
    stay bf16/f16 (float32 dots use IEEE precision, not TF32); p is cast to the value dtype for
    the second product.
  * Lengths that are not block multiples are padded inside the wrapper; padded keys are masked by
    index, padded query rows are computed and dropped. Per-row lengths (q_lengths, kv_lengths)
    become segment ids (sentinel ids that never match), so the kernel has one masking path.
  * A query that sees no key gets out = 0, lse = -inf (no NaN: the running max is made safe).
Compile params use `jax.experimental.pallas.triton.CompilerParams`, which selects the Triton
lowering (not Mosaic GPU) in jax 0.11. `interpret=True` runs the same kernel on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels.launch import gpu_device, triton_call
from lcinfer.pallas_kernels.reference import attention_reference, check_attention_args

SUPPORTED_HEAD_DIMS = (64, 128)
MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16
_PAD_Q_SEG = int(np.iinfo(np.int32).min)       # padded query rows: never match
_PAD_KV_SEG = int(np.iinfo(np.int32).min) + 1  # padded keys: never match

# (device_kind substring, head_dim) -> (block_q, block_k, num_warps, num_stages). head_dim 128 on
# Hopper: the best of an 8-config sweep on an H100 (benchmarks/kernels.py --tune, 2026-11-22:
# 364 TFLOP/s at 8K, 472 at 32K against 339 / 439 for (128, 64, 8, 3)); the others are
# FlashAttention-2 / Triton tutorial starting points, not yet tuned here.
_BLOCK_TABLE = {
    ("H100", 64): (128, 64, 4, 3),
    ("H100", 128): (128, 128, 8, 3),
    ("H200", 64): (128, 64, 4, 3),
    ("H200", 128): (128, 128, 8, 3),
    ("A100", 64): (128, 64, 4, 3),
    ("A100", 128): (128, 64, 8, 2),
}


def _pow2_at_most(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def _next_pow2(n: int) -> int:
  return 1 << (max(1, n) - 1).bit_length()


def pick_blocks(device_kind: str | None, t: int, s: int, d: int) -> tuple[int, int, int, int]:
  """(block_q, block_k, num_warps, num_stages) for a device kind (e.g. "NVIDIA H100 80GB HBM3")
  and problem size: a small table, else a heuristic; blocks shrink (powers of two, >= 16) for
  short sequences so that T = 1 does not pay for 128 padded rows."""
  bq, bk, warps, stages = 64, 64, (4 if d <= 64 else 8), 2
  for (kind, dd), cfg in _BLOCK_TABLE.items():
    if device_kind and kind in device_kind and dd == d:
      bq, bk, warps, stages = cfg
      break
  bq = max(MIN_BLOCK, min(bq, _next_pow2(t)))
  bk = max(MIN_BLOCK, min(bk, _next_pow2(s)))
  return bq, bk, warps, stages


def _check_block(name, b):
  if not isinstance(b, int) or b < MIN_BLOCK or b & (b - 1):
    raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK} (Triton tile), got {b!r}")


def _kernel(*refs, scale, causal, window, kv_offset, block_q, block_k, s_valid, num_kv_blocks,
            num_q_blocks, has_seg, aliased, f32_dots):
  q_ref, k_ref, v_ref = refs[:3]
  rest = refs[3:]
  if has_seg:
    qseg_ref, kvseg_ref, *rest = rest
  if aliased:
    rest = rest[2:]  # the NaN-filled buffers aliased to the outputs; never read
  o_ref, lse_ref = rest

  # Heaviest (last) query blocks first: better tail balance under causal masking.
  qb = num_q_blocks - 1 - pl.program_id(0)
  q_lo = kv_offset + qb * block_q                      # absolute position of the first query row
  q_pos = q_lo + jnp.arange(block_q, dtype=jnp.int32)  # [bq]
  q = q_ref[...]                                       # [bq, D]
  q_seg = qseg_ref[...] if has_seg else None
  precision = lax.Precision.HIGHEST if f32_dots else None
  qk_scale = scale * osm.LOG2E                            # base-2 softmax

  lo = 0
  hi = num_kv_blocks
  if causal:  # last visible key is q_lo + block_q - 1
    hi = jnp.minimum(lax.div(q_lo + block_q - 1, block_k) + 1, num_kv_blocks)
  if window is not None:  # first visible key is q_lo - window + 1
    lo = lax.div(jnp.maximum(q_lo - window + 1, 0), block_k)
  # Interior blocks [lo_full, hi_full) are visible to every row of the query block (before the
  # diagonal, inside the window, no padded tail): they skip the mask arithmetic. Segment ids
  # mask every block.
  hi_full = s_valid // block_k
  if causal:  # the whole key block at or before the first query row
    hi_full = jnp.minimum(hi_full, lax.div(q_lo + 1, block_k))
  lo_full = lo
  if window is not None:  # every key after the last row's window start q_lo + block_q - window
    lo_full = jnp.maximum(lo, lax.div(jnp.maximum(q_lo + block_q - window, 0) + block_k - 1, block_k))
  lo_full = jnp.minimum(lo_full, hi)
  hi_full = jnp.clip(hi_full, lo_full, hi)

  def body(kb, carry, masked):
    start = pl.multiple_of(kb * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = osm.logits(q, k, qk_scale, precision)  # [bq, bk] f32
    k_pos = start + jnp.arange(block_k, dtype=jnp.int32)
    mask = None

    def _and(a, b):
      return b if a is None else a & b
    if masked and s_valid % block_k:
      mask = _and(mask, (k_pos < s_valid)[None, :])
    if masked and causal:
      mask = _and(mask, k_pos[None, :] <= q_pos[:, None])
    if masked and window is not None:
      mask = _and(mask, q_pos[:, None] - window < k_pos[None, :])
    if has_seg:
      kv_seg = kvseg_ref[pl.ds(start, block_k)]
      mask = _and(mask, q_seg[:, None] == kv_seg[None, :])
    return osm.update(carry, s, v, mask, precision)

  # KV blocks in descending order (diagonal first): the programs in flight, consecutive query
  # blocks of one head, then sweep the keys together and share them in L2 (ascending, a newly
  # started program rereads the head's keys from 0, and at 128K the head's K/V exceeds L2).
  masked = functools.partial(body, masked=True)
  carry = osm.init(block_q, q.shape[-1])
  carry = osm.descending(hi_full, hi, masked, carry)                                  # diagonal, tail
  carry = osm.descending(lo_full, hi_full, functools.partial(body, masked=False), carry)  # interior
  carry = osm.descending(lo, lo_full, masked, carry)                                  # window edge
  out, lse = osm.finish(carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "window", "kv_offset", "block_q", "block_k", "num_warps", "num_stages",
    "interpret", "poison"))
def _flash(q_BTHD, k_BSKD, v_BSKD, q_seg, kv_seg, *, scale, causal, window, kv_offset, block_q,
           block_k, num_warps, num_stages, interpret, poison):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  nq, nk = pl.cdiv(t, block_q), pl.cdiv(s, block_k)
  tp, sp = nq * block_q, nk * block_k
  q = jnp.pad(q_BTHD, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  k = jnp.pad(k_BSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  v = jnp.pad(v_BSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  has_seg = q_seg is not None

  def qmap(i, bi, hi):
    return (bi, nq - 1 - i, hi, 0)

  def kvmap(i, bi, hi):
    return (bi, 0, hi // g, 0)  # GQA: query head hi reads kv head hi // G, no repeat in memory

  def lsemap(i, bi, hi):
    return (bi, hi, nq - 1 - i)

  q_spec = pl.BlockSpec((None, block_q, None, d), qmap)
  kv_spec = pl.BlockSpec((None, sp, None, d), kvmap)
  lse_spec = pl.BlockSpec((None, None, block_q), lsemap)
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if has_seg:
    args += [jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=_PAD_Q_SEG),
             jnp.pad(kv_seg, ((0, 0), (0, sp - s)), constant_values=_PAD_KV_SEG)]
    in_specs += [pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, nq - 1 - i)),
                 pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
               jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  kernel = functools.partial(
      _kernel, scale=scale, causal=causal, window=window, kv_offset=kv_offset, block_q=block_q,
      block_k=block_k, s_valid=s, num_kv_blocks=nk, num_q_blocks=nq, has_seg=has_seg,
      aliased=poison is not None, f32_dots=q.dtype == jnp.float32)
  out, lse = triton_call(kernel, args, grid=(nq, b, h), in_specs=in_specs, out_specs=[q_spec, lse_spec],
                         out_shape=out_shape, num_warps=num_warps, num_stages=num_stages,
                         interpret=interpret, name="lcinfer_flash_fwd", poison=poison)
  return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))


def _gpu_backend() -> str | None:
  dev = gpu_device()
  return None if dev is None else dev.device_kind


def flash_attention(q_BTHD, k_BSKD, v_BSKD, *, scale: float, causal: bool = True,
                    window: int | None = None, q_segment_ids=None, kv_segment_ids=None,
                    kv_offset: int = 0, q_lengths=None, kv_lengths=None, block_q: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, interpret: bool = False,
                    _poison: float | None = None):
  """Flash attention forward. Returns (out [B, T, H, D] in q's dtype, lse [B, T, H] float32).

  Raises ValueError for malformed calls (shapes, dtypes, window <= 0, block sizes) and
  `dispatch.Unsupported` for valid calls this kernel does not cover (head_dim, no GPU without
  interpret) so that the dispatcher can fall back.
  """
  check_attention_args(q_BTHD, k_BSKD, v_BSKD, scale=scale, causal=causal, window=window,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       kv_offset=kv_offset, q_lengths=q_lengths, kv_lengths=kv_lengths)
  b, t, h, d = q_BTHD.shape
  s = k_BSKD.shape[1]
  if d not in SUPPORTED_HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {d} is not supported by the Triton flash kernel "
                               f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  if t == 0 or s == 0:
    raise dispatch.Unsupported(f"empty sequence (T={t}, S={s})")
  kind = _gpu_backend()
  if not interpret and kind is None:
    raise dispatch.Unsupported("the Triton flash kernel needs a CUDA GPU; pass interpret=True to "
                               "run it on CPU")
  bq, bk, warps, stages = pick_blocks(kind, t, s, d)
  block_q = bq if block_q is None else block_q
  block_k = bk if block_k is None else block_k
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  q_seg = kv_seg = None
  if q_segment_ids is not None or q_lengths is not None or kv_lengths is not None:
    q_seg = (jnp.zeros((b, t), jnp.int32) if q_segment_ids is None
             else jnp.asarray(q_segment_ids, jnp.int32))
    kv_seg = (jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None
              else jnp.asarray(kv_segment_ids, jnp.int32))
    if q_lengths is not None:
      q_seg = jnp.where(jnp.arange(t)[None] < jnp.asarray(q_lengths)[:, None], q_seg, _PAD_Q_SEG)
    if kv_lengths is not None:
      kv_seg = jnp.where(jnp.arange(s)[None] < jnp.asarray(kv_lengths)[:, None], kv_seg, _PAD_KV_SEG)
  return _flash(q_BTHD, k_BSKD, v_BSKD, q_seg, kv_seg, scale=float(scale), causal=bool(causal),
                window=window, kv_offset=kv_offset, block_q=block_q, block_k=block_k,
                num_warps=num_warps or warps, num_stages=num_stages or stages,
                interpret=bool(interpret), poison=_poison)


dispatch.register("flash_attention", "triton", flash_attention)
dispatch.register("flash_attention", "xla", attention_reference)
