"""Hopper flash-decoding over an int4 KIVI cache (Pallas, Mosaic GPU lowering: TMA + wgmma).

    out_BTHD, lse_BTH = quantized_decode_attention_mgpu(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=...)

Same contract as `decode_quant.quantized_decode_attention` (layouts: `quant.py`; visibility by
position as in `decode.py`; optional bf16 residual window merged by lse), for the layout KIVI
(Liu et al. 2024) recommends and the benchmarks use: 4-bit keys per channel in token
groups that are a multiple of block_k (64), 4-bit values per token (group = head_dim), bf16
queries, scales and zeros, head_dim 128. Any other call raises `dispatch.Unsupported`, so the
dispatcher falls through to the Triton kernel.

Why a second kernel: the Triton one is issue-bound (ncu, H100, 128K: ~60M warp instructions, 8
per cached element before the PTX unpacking, its float work on tiles padded to 16 rows and
layout conversions through shared memory), and int4 stayed at 0.8-1.2x the bf16 cache's time.

Design (one CTA = one warpgroup per (split of the cache, kv head, batch)):
  * The products are transposed, S^T = K Q^T and O^T = V^T P^T: the block's 64 keys fill the
    wgmma's 64-row M side and the G*T query rows its N side (padded to 8, 16, 32 or 64), so the
    softmax works on [64, N] tiles instead of the [64 queries, 64 keys] of a prefill tile whose
    rows would be 4 real out of 64. The sums are kept per thread and reduced once at the end.
  * N = 8 when G * T <= 8 (Llama-3-8B's G = 4 at T = 1): the softmax and its sums touch 4 values
    per thread, not 8, and O^T holds half the registers. P is then kept as [8, bk] (a [bk, 8]
    tile would need 16-byte rows, which cannot be swizzled) and fed to P V transposed.
  * Lazy maximum (the conditional rescaling of FlashAttention-4's kernels): a block recomputes
    the running max (a cross-warp reduction) and rescales O^T and the sums only if some logit
    exceeds the max by more than LAZY_TAU = 8 (base 2: P <= 256, exact in bf16 and float32).
    Testing that takes one warp vote and a 4-flag exchange. H100, 128K: 0.107-0.114 ms against
    0.122-0.129 with the max recomputed every block, in the same runs.
  * Speculative P (with the lazy maximum): P is computed in the current max before the vote is
    known, and the vote's flags are published by the P fence's warpgroup barrier (two flag
    buffers, alternating), so a stage waits at one warpgroup barrier, not two; a vote that finds
    a logit above the bound redoes P after the rescale. H200, 128K (ncu, same run): the kernel
    49.09 -> 47.49 us, 168 registers (still three CTAs per SM); the whole call 0.368x -> 0.355x of
    bf16 (session 15), so the vote with its own barrier was removed.
  * TMA brings stage j + stages - 1 (the key and value codes) into a ring slot while stage j is
    computed; one barrier per slot. A stage is two 64-key blocks where every split holds whole
    stages and the key scales allow (`stage_blocks`). The small per-key rows (key-scale rows, value
    scales and zeros, positions) come in chunks of `meta` = 4 stages through a second, two-slot
    ring, one stage ahead: 5 copies per 512 keys instead of per 128 (H200, 128K: 49.0 against
    50.2 us for chunks of one stage; 8 do not leave shared memory for three CTAs per SM). One
    warp issues a stage's copies (`issue_warp`), and a stage's two blocks share one product
    wait, one lazy-max vote and one P fence (`pair`): 52.2 -> 50.0 us together. Pallas's
    automatic barriers are off: the kernel's own order suffices (every read of a slot precedes
    the block's P fence, which precedes the reissue; the flags of the lazy max are read before
    the same fence; a meta slot is reissued a whole stage after its last reader).
  * Both int4 tiles go straight into wgmma's A registers, by the "magic number" of fast int4 GEMMs
    (Kim et al. 2022, Sec. 4): lop3 ORs a nibble into the mantissa of 128.0, so x = 128 + c exactly.
      keys:   two `ldmatrix.x4` per thread put the codes in the 8-bit WGMMA layout; 4 code bytes
              of a row (byte j holds channel j in its low nibble and channel j + D/2 in its high
              one) -> prmt, lop3, then sub.bf16x2 and fma.bf16x2 make c * s + z
              (per-channel scale row; one rounding). Each thread's pairs land in A columns other
              than their channels, a fixed permutation (`mgpu_int4.key_channel_order`) that the
              queries (the B side) take too.
      values: V^T (A of O^T = V^T P^T) read by two `ldmatrix.x4.trans` per thread: the transposed
              8x8 b16 load hands a thread one byte pair of two consecutive keys per register, so
              3 shifts and 4 lop3 make 8 values x = 128 + c, no prmt, no shared-memory tile, no
              stores. The rows come in `value_channel_order`; O^T's rows are put back outside.
              The per-token scale goes into P's rows (p' = bf16(p s_t)), and the rest is per
              query: out = (O^T + sum_t (p_t z_t - 128 p'_t)) / l, one per-thread sum. It uses
              the same rounded p' as the MMA, so the 128 offset cancels up to float32 rounding.
  * The value tile is unpacked while the QK^T wgmma runs.
  * Wide code tiles (`wide`): a stage's codes come as 128-byte TMA rows of two keys (a [C / 2, 128]
    view of the [C, 64] codes, 128-byte swizzle), which both ldmatrix paths address by
    `mgpu_int4.code_offset`. With 64-byte rows the TMA held the copies alone at ~67% of peak DRAM
    (H200, 128K, no compute: 48.2 us); with 128-byte rows 85% (38.0 us).
  * Packed logits (`packed`; one query, G <= 4, paired blocks; the default there): at G = 4 half
    of the [64, 8] logit tile's columns were padding, and the lanes holding them did half the
    softmax for nothing. Block 1's K Q^T takes the queries 4 rows down and accumulates into block
    0's tile, so columns 0-3 are block 0's logits and 4-7 block 1's; each half keeps its own
    online softmax (max, sums, O^T columns), P goes to two tiles each with the other half zero,
    and the halves are merged by lse at the end (a shfl.bfly 2 swaps columns c and c ^ 4).
    H200, 128K (ncu): 47.2 -> 45.9 us at G = 4; 46.9 -> 45.0 us at G = 1; 47.1 -> 45.4 at G = 2.
  * One query (T = 1, `q_direct`): the kernel takes q as a [B, K, G, D] view of [B, 1, H, D] (no
    copy), TMAs a head's G rows and builds the permuted, swizzled wgmma B tile itself (rows past G
    zero; one position for all rows), so no XLA kernel runs before it. T > 1 goes through
    `kv_head_rows` in XLA.
  * Splits are combined by lse outside: for one query with G a power of two by one Pallas kernel that
    also puts the channels back in order and writes [B, 1, H, D] (`combine.py`; the kernel's
    partial buffers are then padded to `combine.padded_splits`), else in XLA (`combine.combine_splits`).
Measured (B=1, H=32, K=8, D=128, 128K; benchmarks/NOTES.md, sessions 11-15): H200, 49 splits, 2
stages: 0.0469 ms of GPU time per call = 0.343x the bf16 call's 0.1366 (profiler timeline; two
kernels, the decode kernel 45.9 us by ncu, three CTAs per SM by registers; wall clock with 8 calls
per executable 0.056 ms = 0.387x in the same run, host dispatch included; session 14: 0.0510 ms =
0.368x on both). It is bound by its instruction issue at three warpgroups per SM (session 15's SASS:
735 instructions per warp per stage, half of them the int4 unpacking, ~0.52 issued per scheduler
per cycle), not by its loads. Tried and not kept: work stealing between a head's CTAs (balances the
SMs, the same call time, output not bitwise reproducible run to run), issuing a stage's reload as
soon as its codes are in registers (slower), the values unpacked after the products (`late-v`:
slower, no fourth CTA), P V left in flight across stages (no faster), four unpaired CTAs per SM
(slower). Session 11's kernel (52.2 us): with
the combination in XLA 0.069-0.075 ms (4 kernels), with the queries prepared in XLA too 0.079 ms (6
kernels).
No interpret mode (wgmma): CPU tests lower it for a CUDA target, the GPU tests run it.
The kernel itself (body, launch) is in `decode_quant_mgpu_kernel.py`, its geometry in
`decode_quant_mgpu_geometry.py`; this file holds the wrapper: the argument checks, the query
preparation, the grid and the lse combination.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcinfer.pallas_kernels import combine, dispatch
from lcinfer.pallas_kernels import mgpu_int4
from lcinfer.pallas_kernels.combine import combine_splits, from_kv_head_rows
from lcinfer.pallas_kernels.decode import kv_head_rows
from lcinfer.pallas_kernels.decode_quant import _check, merge_residual  # one argument check, one merge
from lcinfer.pallas_kernels.decode_quant_mgpu_geometry import Geometry
from lcinfer.pallas_kernels.decode_quant_mgpu_kernel import HEAD_DIM
from lcinfer.pallas_kernels.decode_quant_mgpu_kernel import call_kernel as _call
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.quant import QuantizedTensor

MAX_ROWS = 64      # query rows per kv head (G * T): the wgmma N side, padded to 16 / 32 / 64
BLOCK_K = 64


def _prepare(g: Geometry, q_BTHD, q_pos_BT):
  """Queries as the kernel takes them: one [n_q, D] tile per kv head, columns in the key tile's order
  (q_direct: [B, K, G, D], a view of [B, 1, H, D], and the [B, 1] positions; the kernel does the rest)."""
  if g.q_direct:
    b, _, h, d = q_BTHD.shape
    return q_BTHD.reshape(b, g.kh, h // g.kh, d), q_pos_BT.astype(jnp.int32)
  q, qpos = kv_head_rows(q_BTHD, q_pos_BT, g.kh, g.n_q)
  return q[..., mgpu_int4.key_channel_order(HEAD_DIM // 2)].astype(jnp.bfloat16), qpos


def _finish(g: Geometry, o_part, lse_part, t: int, dtype):
  """The splits' partial O^T (rows in the value tile's order) combined by lse -> (out, lse)."""
  if g.fused_combine:
    # 16 channels per program (64 programs at K = 8): 1.72 us of GPU time against 1.96 at 32 (H200, 128K,
    # benchmarks/probes/combine_probe.py, session 14)
    return combine.combine_partials(o_part, lse_part, splits=g.splits, g=g.rows, layout="channels",
                                    interleave16=True, out_dtype=dtype, channels=16)
  o_part = jnp.swapaxes(o_part, -1, -2)
  o_part = o_part[..., np.argsort(mgpu_int4.value_channel_order(HEAD_DIM // 2))]
  out, lse = from_kv_head_rows(*combine_splits(o_part, lse_part, g.rows), t)
  return out.astype(dtype), lse


def _cache_args(g: Geometry, k_q, v_q, pos_BKC):
  """The kernel's cache operands; the per-key rows (value scales, zeros, positions) as [B, K, C / sk,
  sk] views (no copy), one row per TMA stage, so a chunk of them is one copy of <= 256 per side."""
  b, kh, c = pos_BKC.shape
  rows = lambda x: x.reshape(b, kh, c // g.stage_keys, g.stage_keys)
  codes = lambda x: x.reshape(b, kh, c // g.code_rows, -1)   # g.wide: 128-byte rows of two keys (a view)
  return (codes(k_q.codes), k_q.scale, k_q.zero, codes(v_q.codes), rows(v_q.scale[..., 0]), rows(v_q.zero[..., 0]),
          rows(pos_BKC.astype(jnp.int32)))


@functools.partial(jax.jit, static_argnames=("g", "f32_out"))
def _run(g: Geometry, q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, f32_out: bool = False):
  """f32_out: float32 out, for a residual merge that rounds once (the gpu test's residual case read
  one bf16 ulp over its 1e-2 bound at some split counts when both parts were rounded first)."""
  o_part, lse_part = _call(g, *_prepare(g, q_BTHD, q_pos_BT), *_cache_args(g, k_q, v_q, pos_BKC))
  return _finish(g, o_part, lse_part, q_BTHD.shape[1], jnp.float32 if f32_out else q_BTHD.dtype)


def served(q_BTHD, k_q: QuantizedTensor, v_q: QuantizedTensor, block_k: int) -> str | None:
  """Why this kernel cannot serve the call (None: it can)."""
  b, t, h, d = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  if q_BTHD.dtype != jnp.bfloat16:
    return f"queries must be bfloat16, got {q_BTHD.dtype}"
  if d != HEAD_DIM:
    return f"head_dim {d} (only {HEAD_DIM})"
  if (k_q.bits, v_q.bits) != (4, 4):
    return f"{k_q.bits}/{v_q.bits}-bit keys/values (only 4/4)"
  if k_q.axis != "channel" or k_q.group % block_k:
    return (f"keys must be quantized per channel in token groups that are a multiple of {block_k} "
            f"(got axis={k_q.axis!r}, group={k_q.group})")
  if v_q.axis != "token" or v_q.group != d:
    return f"values must be quantized per token over all channels (got axis={v_q.axis!r}, group={v_q.group})"
  if c == 0 or c % block_k:
    return f"the cache length {c} must be a positive multiple of {block_k}"
  if (h // kh) * t > MAX_ROWS:
    return f"G*T = {(h // kh) * t} query rows per kv head exceeds {MAX_ROWS}"
  dtypes = {x.dtype for x in (k_q.scale, k_q.zero, v_q.scale, v_q.zero)}
  if dtypes != {jnp.dtype(jnp.bfloat16)}:  # (a cast here would be a pass over the scales every step)
    return f"scales and zeros must be bfloat16 (quant.quantize(..., scale_dtype=jnp.bfloat16)), got {dtypes}"
  return None


def pick_splits(dev, b: int, kh: int, n_blocks: int) -> int:
  """Three CTAs per SM, in one wave. H100, 128K, K = 8, before the lazy maximum: 48 or 49 splits
  read 0.116-0.155 ms; 32 or 64 splits 0.13-0.14 ms; 50 splits (400 CTAs, 4 past one wave)
  0.16-0.19 ms in four of five runs. H200, session 10 (127 registers: four CTAs per SM fit), 8 calls
  per executable: 49 splits 0.0655 ms, 64 splits 0.0673, 128 splits 0.0705, so three stay."""
  sms = getattr(dev, "core_count", None) or 132
  return max(1, min(n_blocks, (3 * sms) // (b * kh)))


def quantized_decode_attention_mgpu(q_BTHD, k_q: QuantizedTensor, v_q: QuantizedTensor, pos_BKC, q_pos_BT,
                                    *, scale: float, window: int | None = None, residual=None,
                                    num_splits: int | None = None, block_k: int | None = None,
                                    num_stages: int | None = None, interpret: bool = False, num_warps=None,
                                    _poison=None, _unpack=None):
  """Flash-decoding over an int4 KIVI cache on Hopper (module docstring). Returns (out [B, T, H, D]
  in q's dtype, lse [B, T, H] float32). `dispatch.Unsupported` for calls it does not serve;
  The Triton kernel's knobs (num_warps, _poison, _unpack), when set, are `Unsupported` too."""
  _check(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale, window, residual)
  dispatch.triton_only(num_warps=num_warps, _poison=_poison, _unpack=_unpack)
  if interpret:
    raise dispatch.Unsupported("Mosaic GPU (wgmma) kernels have no interpret mode")
  dev = hopper_device()
  if dev is None:
    raise dispatch.Unsupported("the Mosaic GPU quantized decode kernel needs a Hopper GPU (sm_90)")
  bk = block_k or BLOCK_K
  if bk != BLOCK_K:
    raise dispatch.Unsupported(f"block_k {bk} (only {BLOCK_K})")
  why = served(q_BTHD, k_q, v_q, bk)
  if why:
    raise dispatch.Unsupported(why)
  return _dispatch_run(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=scale, window=window, residual=residual,
                       num_splits=num_splits or pick_splits(dev, q_BTHD.shape[0], k_q.shape[1], k_q.shape[2] // bk),
                       block_k=bk, num_stages=num_stages or 2)


def stage_blocks(nb: int, block_k: int, group: int) -> int:
  """Blocks per TMA stage: 2 when every split can hold whole stages (an even block count) and a
  stage's key scales are one row or one row per block, else 1."""
  return 2 if nb % 2 == 0 and (group % (2 * block_k) == 0 or group == block_k) else 1


def geometry(q_BTHD, k_q, *, scale, window, num_splits, block_k, num_stages, lazy_max=True,
             sub=None, q_direct=None, fused_combine=None, issue_warp=True, pair=True, meta=4,
             wide=True, packed=None, probe="") -> Geometry:
  """The launch geometry of a call. sub: blocks per TMA stage (None: `stage_blocks`); q_direct:
  queries taken raw by the kernel (None: when T = 1, the only case it serves); fused_combine: the
  splits combined by one Pallas kernel (None: where `combine.served`); packed: a stage's two blocks
  in one logit tile (it applies to one query, G <= 4, pair; None: wherever it applies);
  issue_warp, pair, meta, wide, probe: `Geometry`'s fields (defaults as measured best, module
  docstring)."""
  b, t, h, _ = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  nb = c // block_k
  allowed = stage_blocks(nb, block_k, k_q.group)
  sub = allowed if sub is None else sub
  if sub not in (1, allowed):
    raise ValueError(f"{sub} blocks per stage: C = {c} and the key group {k_q.group} allow {allowed}")
  bps = sub * -(-nb // (sub * max(1, min(num_splits, nb // sub))))   # whole stages per split
  q_direct = (t == 1) if q_direct is None else q_direct and t == 1
  pair = pair and sub == 2
  fits = q_direct and pair and (h // kh) * t <= 4
  if packed and not fits:
    raise ValueError("packed needs one query (T = 1, q_direct), G <= 4 and a stage's two blocks paired (pair, sub = 2)")
  return Geometry(b=b, kh=kh, rows=(h // kh) * t, c=c, block_k=block_k, splits=-(-nb // bps),
                  blocks_per_split=bps, stages=num_stages, group=k_q.group, scale=float(scale), window=window,
                  lazy_max=lazy_max, sub=sub, q_direct=q_direct,
                  fused_combine=combine.served(t, h // kh, HEAD_DIM) and fused_combine in (None, True),
                  issue_warp=issue_warp, pair=pair, meta=meta,
                  packed=fits if packed is None else bool(packed),
                  wide=wide, probe=probe)


def _dispatch_run(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, *, scale, window, residual, **knobs):
  """Builds the geometry (`geometry`'s knobs) and runs; no device checks (the CPU lowering test
  calls this)."""
  g = geometry(q_BTHD, k_q, scale=scale, window=window, **knobs)
  out = _run(g, q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, f32_out=residual is not None)
  out, lse = merge_residual(out, q_BTHD, q_pos_BT, residual, scale=scale, window=window)
  return out.astype(q_BTHD.dtype), lse


# First in the default order: on a Hopper GPU it serves the KIVI int4 layout; every other call
# (no Hopper, interpret mode, other bits or groupings) falls through to "triton".
dispatch.register("quantized_decode_attention", "mosaic_gpu", quantized_decode_attention_mgpu, first=True)
