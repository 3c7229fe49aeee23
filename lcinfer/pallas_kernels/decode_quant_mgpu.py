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
  * TMA brings stage j + stages - 1 (codes, the key-scale rows, per-token value scales, positions)
    into a ring slot while stage j is computed; one barrier per slot. A stage is two 64-key
    blocks where every split holds whole stages and the key scales allow (`stage_blocks`), so the
    7 copies are issued once per 128 keys. Pallas's automatic barriers are off: the kernel's own
    order suffices (every read of a slot precedes the block's P fence, which precedes the reissue;
    the flags of the lazy max are read before the same fence).
  * Both int4 tiles go straight into wgmma's A registers, by the "magic number" of fast int4 GEMMs
    (Kim et al. 2022, Sec. 4): lop3 ORs a nibble into the mantissa of 128.0, so x = 128 + c exactly.
      keys:   4 code bytes of a row (byte j holds channel j in its low nibble and channel j + D/2
              in its high one) -> prmt, lop3, then sub.bf16x2 and fma.bf16x2 make c * s + z
              (per-channel scale row; one rounding). Each thread's pairs land in A columns other
              than their channels, a fixed permutation (`mgpu_inline.key_channel_order`) that the
              queries (the B side) take too.
      values: V^T (A of O^T = V^T P^T) read by two `ldmatrix.x4.trans` per thread: the transposed
              8x8 b16 load hands a thread one byte pair of two consecutive keys per register, so
              3 shifts and 4 lop3 make 8 values x = 128 + c, no prmt, no shared-memory tile, no
              stores. The rows come in `value_channel_order`; O^T's rows are put back outside.
              The per-token scale goes into P's rows (p' = bf16(p s_t)), and the rest is per
              query: out = (O^T + sum_t (p_t z_t - 128 p'_t)) / l, one per-thread sum. It uses
              the same rounded p' as the MMA, so the 128 offset cancels up to float32 rounding.
  * The value tile is unpacked while the QK^T wgmma runs.
  * Splits are combined by lse outside (`decode.combine_splits`).
Measured (B=1, H=32, K=8, D=128, 128K; benchmarks/NOTES.md, session 10): H200, 49 splits, 2 stages:
0.074-0.077 ms per call (0.0676 ms with 8 calls in one executable, ncu 52.8 us for the kernel
alone: the rest is the query preparation, the lse combination and host dispatch); 0.46-0.50x the
bf16 kernel. Before the register value tile (same runs): 0.087-0.092 ms. ncu: 28.0M warp
instructions (~430 per warp and 64-key block; 42.7M before), 127 registers (four CTAs per SM fit).
No interpret mode (wgmma): CPU tests lower it for a CUDA target, the GPU tests run it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import mgpu_inline as mi
from lcinfer.pallas_kernels.decode import combine_splits, from_kv_head_rows, kv_head_rows
from lcinfer.pallas_kernels.decode_quant import _check, merge_residual  # one argument check, one merge
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.online_softmax import LN2, LOG2E
from lcinfer.pallas_kernels.quant import QuantizedTensor

MAX_ROWS = 64      # query rows per kv head (G * T): the wgmma N side, padded to 16 / 32 / 64
HEAD_DIM = 128
BLOCK_K = 64


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

  @property
  def n_blocks(self) -> int:
    return self.c // self.block_k

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


def _body(g: Geometry, q_ref, qpos_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, o_ref,
          lse_ref, q_smem, kc_smem, vc_smem, ks_smem, kz_smem, vs_smem, vz_smem, pos_smem, p_smem,
          o_smem, lse_smem, flags, full, q_bar):
  plgpu = mi.plgpu()
  split, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
  bk, half, stages, nq = g.block_k, HEAD_DIM // 2, g.stages, g.n_q
  first = split * g.blocks_per_split
  n = jnp.minimum(g.blocks_per_split, g.n_blocks - first)   # blocks of this split (a multiple of sub)
  n_st = lax.div(n, jnp.int32(g.sub))                          # TMA stages
  sk, rows = g.stage_keys, g.scale_rows

  def issue(j):  # stage j (blocks first + sub j ..) into slot j % stages
    slot = lax.rem(j, jnp.int32(stages))
    start = pl.multiple_of(first * bk + j * sk, sk)
    keys = pl.ds(start, sk)
    grp = lax.div(start, jnp.int32(g.group))
    for src, dst in ((kc_ref.at[b, h, keys], kc_smem), (vc_ref.at[b, h, keys], vc_smem),
                     (ks_ref.at[b, h, pl.ds(grp, rows)], ks_smem), (kz_ref.at[b, h, pl.ds(grp, rows)], kz_smem),
                     (vs_ref.at[b, h, keys], vs_smem), (vz_ref.at[b, h, keys], vz_smem),
                     (pos_ref.at[b, h, keys], pos_smem)):
      plgpu.copy_gmem_to_smem(src, dst.at[slot], full.at[slot])

  plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar)
  for j in range(stages - 1):
    pl.when(j < n_st)(functools.partial(issue, j))

  wgmma_layout = plgpu.Layout.WGMMA
  key_layout, query_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)   # S^T: [keys, queries]
  scol = plgpu.Layout.WGMMA_8BIT.reduce(0)
  dequant_k = mi.int4_dequant_regs_fn(half, bk)
  dequant_v = mi.int4_value_regs_fn(half, bk)
  any_above = mi.any_above_fn() if g.lazy_max else None
  shape = (bk, nq)
  bq = lambda x: lax.broadcast_in_dim(x, shape, [1])   # [nq] -> [bk, nq]
  bkey = lambda x: lax.broadcast_in_dim(x, shape, [0])  # [bk] -> [bk, nq]
  qpos_b = bq(plgpu.load(qpos_ref.at[b], layout=query_layout, optimized=False))
  c = g.scale * LOG2E
  m = plgpu.layout_cast(jnp.full((nq,), -jnp.inf, jnp.float32), query_layout)
  zeros = plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), wgmma_layout)
  acc = plgpu.layout_cast(jnp.full((HEAD_DIM, nq), 0.0, jnp.float32), wgmma_layout)
  plgpu.barrier_wait(q_bar)

  def block(carry, slot, part):  # the part-th block_k keys of the stage in `slot`
    acc, m, l_part, zb_part = carry
    keys = pl.ds(part * bk, bk)
    row = 0 if rows == 1 else part
    kscales = tuple(plgpu.load(r.at[slot, row, pl.ds(p * half, half)], layout=scol, optimized=False)
                    for r in (ks_smem, kz_smem) for p in (0, 1))
    kd = dequant_k(kc_smem.at[slot, keys], kscales)    # wgmma A registers, columns in key_channel_order
    vs = bkey(plgpu.load(vs_smem.at[slot, keys], layout=key_layout, optimized=False).astype(jnp.float32))
    vz = bkey(plgpu.load(vz_smem.at[slot, keys], layout=key_layout, optimized=False).astype(jnp.float32))
    kpos = plgpu.load(pos_smem.at[slot, keys], layout=key_layout, optimized=False)

    def qk(acc_ref):  # S^T = K Q^T: keys fill the 64-row M side, the queries N
      plgpu.wgmma(acc_ref, kd, q_smem.transpose((1, 0)))
      vt = dequant_v(vc_smem.at[slot, keys])   # V^T's registers, unpacked under the product:
      return acc_ref[...], vt                  # before the read, which waits for it
    s, vt = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))

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
      return (m_new, acc * lax.broadcast_in_dim(alpha, acc.shape, [1]), l_part * a2, zb_part * a2)

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

    def pv(acc_ref):  # O^T += V^T P^T (V tile holds 128 + code; registers: rows in value_channel_order)
      plgpu.wgmma(acc_ref, vt, p_smem.transpose((1, 0)) if g.p_transposed else p_smem)
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    return acc, m, l_part, zb_part

  def stage(j, carry):
    @pl.when(j + stages - 1 < n_st)
    def _():
      issue(j + stages - 1)

    slot = lax.rem(j, jnp.int32(stages))
    plgpu.barrier_wait(full.at[slot])   # once per arrival: the barrier tracks its phase
    for part in range(g.sub):
      carry = block(carry, slot, part)
    return carry

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


def _call(g: Geometry, q, qpos, kc, ks, kz, vc, vs, vz, pos):
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
  )
  out_type = (jax.ShapeDtypeStruct((g.b, g.kh, g.splits, d, nq), jnp.float32),
              jax.ShapeDtypeStruct((g.b, g.kh, g.splits, nq), jnp.float32))
  return plgpu.kernel(
      functools.partial(_body, g), out_type=out_type, grid=(g.splits, g.kh, g.b),
      grid_names=("split", "head", "batch"), scratch_types=scratch, kernel_name="lcinfer_qdecode_mgpu",
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True))(
          q, qpos, kc, ks, kz, vc, vs, vz, pos)


def _prepare(g: Geometry, q_BTHD, q_pos_BT):
  """Queries as the kernel takes them: one [n_q, D] tile per kv head, columns in the key tile's order."""
  q, qpos = kv_head_rows(q_BTHD, q_pos_BT, g.kh, g.n_q)
  return q[..., mi.key_channel_order(HEAD_DIM // 2)].astype(jnp.bfloat16), qpos


def _finish(g: Geometry, o_part, lse_part, t: int, dtype):
  """The splits' partial O^T (rows in the value tile's order) combined by lse -> (out, lse)."""
  o_part = jnp.swapaxes(o_part, -1, -2)
  o_part = o_part[..., np.argsort(mi.value_channel_order(HEAD_DIM // 2))]
  out, lse = from_kv_head_rows(*combine_splits(o_part, lse_part, g.rows), t)
  return out.astype(dtype), lse


def _cache_args(k_q, v_q, pos_BKC):
  return (k_q.codes, k_q.scale, k_q.zero, v_q.codes, v_q.scale[..., 0], v_q.zero[..., 0], pos_BKC.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("g", "f32_out"))
def _run(g: Geometry, q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, f32_out: bool = False):
  """f32_out: float32 out, for a residual merge that rounds once (the gpu test's residual case read
  one bf16 ulp over its 1e-2 bound at some split counts when both parts were rounded first)."""
  o_part, lse_part = _call(g, *_prepare(g, q_BTHD, q_pos_BT), *_cache_args(k_q, v_q, pos_BKC))
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
             sub=None) -> Geometry:
  """The launch geometry of a call. sub: blocks per TMA stage (None: `stage_blocks`)."""
  b, t, h, _ = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  nb = c // block_k
  allowed = stage_blocks(nb, block_k, k_q.group)
  sub = allowed if sub is None else sub
  if sub not in (1, allowed):
    raise ValueError(f"{sub} blocks per stage: C = {c} and the key group {k_q.group} allow {allowed}")
  bps = sub * -(-nb // (sub * max(1, min(num_splits, nb // sub))))   # whole stages per split
  return Geometry(b=b, kh=kh, rows=(h // kh) * t, c=c, block_k=block_k, splits=-(-nb // bps),
                  blocks_per_split=bps, stages=num_stages, group=k_q.group, scale=float(scale), window=window,
                  lazy_max=lazy_max, sub=sub)


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
