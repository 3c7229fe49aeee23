"""Hopper attention forward, dense and key-range (block-sparse, vertical-slash) modes, as a Pallas
kernel with the Mosaic GPU lowering: wgmma tensor-core products, TMA loads, warp specialization
(FlashAttention-3, Shah et al. 2024, Sec. 3.1 producer/consumer warpgroups and Sec. 3.2 ping-pong
scheduling of two consumer warpgroups; the online softmax of FlashAttention-2, Algorithm 1, base 2).

    out_BTHD, lse_BTH = flash_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, scale=d ** -0.5, causal=True)
    out_BTHD, lse_BTH = block_sparse_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, layout, scale=...,
                                                    causal=True, columns=None)

One CTA per (query head, query tile of 128 rows, batch), heads the fastest grid axis, heaviest
tile first. Three warpgroups: two consumers own 64 query rows each and share one stream of K/V
blocks that the third (the producer, few registers) copies by TMA into a `stages`-deep ring of
shared-memory slots. Per step a consumer computes S = Q K^T (wgmma, float32 accumulators), masks
only where the step needs it, folds S into its running (max, sum) in base 2, and adds P V (wgmma,
P from registers in the input dtype). The consumers meet at a shared barrier twice per step, one
step out of phase, so that one's softmax overlaps the other's products.

Grid order and L2 (H100, 128K, measured): with tiles the fastest axis and keys ascending, each
newly started CTA rereads its head's K/V (64 MB, more than the 50 MB L2) from key 0 and the kernel
is bandwidth-bound (0.72x cuDNN); keys descending lift that to 0.93x, heads fastest to 1.09x, and
block-sparse at 10% from 6.2x to 9.5x cuDNN dense. The stream runs each tile's list backwards
(nearest the diagonal first).

A tile's stream:
  * dense mode: KV blocks up to the diagonal (causal) or all of them; only the diagonal block and
    a padded tail are masked;
  * ranges mode: the canonical ranges of `vertical_slash.ascending_ranges` (sorted, disjoint,
    clipped; those that every row of the tile sees whole need no mask), each split to lie in one
    8-aligned window of block_k keys (the tiled shared-memory layout needs TMA row offsets that are
    multiples of 8; the vertical-slash builder cuts its pieces that way and marks its lists
    canonical, so they are taken without any sort); the window is loaded, keys outside [lo, hi)
    and above the diagonal masked. With block_k 128, a range that fits the 8-aligned 64-key
    window at its start takes a narrow step (a 64-row TMA into the slot, [64, 64] products): a far
    slash spans 128 keys at an unaligned offset, one 128-key step plus a narrow one for its last
    < 8 keys, where two full steps were needed (measured on the H100: 5-9% faster on every
    vertical-slash set than either 128x64 or 128x128 without narrow steps);
  * then, with gathered columns (one ascending list per head, MInference's verticals), chunks of
    block_k of them: their K/V rows gathered per query head beforehand (contiguous, so TMA loads
    them like any block), row i attending the first thr[i] of the list (those <= i within the
    tile's prefix; one [64] load per warpgroup). Each key is counted once. The list columns
    inside the tile's band (its run of touching ranges that ends at its highest range: the near
    slashes up to the diagonal) are counted by the range steps, and the column steps skip their
    slots [sa, sb) (whole chunks of them are not loaded); so the band's ranges stay unmasked when
    whole. A range outside the band that holds one of the tile's columns masks them with a per-head
    map of the list (a [block_k] load; those ranges run first).
  * split mode (layouts of block_q SPLIT_Q = 56, block_k 64; a tile is two query blocks): each
    consumer owns one 56-row block (it computes 64 rows: wgmma's M) and its own list, in its own
    64-key half of every ring slot. A range of at most 56 + 7 keys fits one 8-aligned 64-key window,
    so a far slash (56 keys per 56 rows, at any offset) costs one 64-key step per consumer, against
    192 keys per 128 rows in the shared-tile mode (H200, 128K: (30, 800) 8.6x -> 12.0x cuDNN). The
    two blocks' bands (their near slashes), which overlap but for 56 keys, are walked first in
    SHARED = 128-key windows that both consumers take, each masking the keys outside its own band
    (when those windows are no more steps than the longer band's own ranges;
    `flash_mgpu_inputs._shared_band`); then, when the tile's blocks take more than 64 columns, the
    column list in SHARED-slot chunks that both consumers take (each masking its own band's slots
    and its rows' thresholds; half the steps of each walking its own 64-slot chunks;
    `flash_mgpu_inputs._shared_columns`); then each consumer's other ranges (and column chunks when
    not shared); the shorter list idles to keep the ping-pong.
    The slot's full barrier takes two arrivals a phase (two half copies, or one copy and a bare
    arrival), so that both consumers wait on every phase of every slot.
Masks are per key where they can be (a [block_k] bias added to S); the per-row part (causal, or a
column chunk that some rows of the warpgroup do not reach) runs only on the steps that need it,
under a uniform lax.cond. A range step's (lo, hi) is read a step ahead (a loop carry).
Lazy maximum (FlashAttention-4's conditional rescaling): the running max m, and with it the
rescaling of O and the sums, moves only when a logit passes m by LAZY_TAU = 8 (base 2), decided by
a warpgroup vote (`mgpu_inline.any_above_fn`); P <= 2^8 is exact enough in bf16 and float32.
A row that sees nothing gets out = 0, lse = -inf. Only bf16 / f16, head_dim 64 or 128, layouts of
block_q x block_k 128x64, 128x128 or 56x64 (`LAYOUT_BLOCKS`). Tests: on CPU the kernel lowers, and
runs in Mosaic GPU's interpret mode (`_run(interpret=True)`; three stand-ins for what the interpreter
cannot run, `flash_mgpu_kernel.interpret_params`) against the oracles; on a Hopper GPU, compiled.
The dispatcher's interpret=True takes the Triton kernel (faster to interpret): this one serves it only
through `_run`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.flash_mgpu_inputs import _gather_columns, _pad_to, _query_blocks, _ranges_inputs
from lcinfer.pallas_kernels.flash_mgpu_kernel import (ALIGN, HEAD_DIMS, SHARED, SPLIT_Q, TILE_Q, Geometry,
                                                      call_kernel)
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.reference import check_attention_args, check_block_sparse_args

__all__ = ["flash_attention_mgpu", "block_sparse_attention_mgpu", "TILE_Q", "SPLIT_Q", "LAYOUT_BLOCKS"]

# (block_q, block_k) of the layouts served: a 128-row tile shared by both consumers, or split mode
# (each consumer its own 56-row block and 64-key windows).
LAYOUT_BLOCKS = ((TILE_Q, 64), (TILE_Q, 128), (SPLIT_Q, 64))


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_k", "stages", "heads_fastest", "lazy_max",
                                             "narrow", "profile", "interpret"))
def _run(q_BTHD, k_BSKD, v_BSKD, layout, columns, *, scale, causal, block_k, stages, heads_fastest,
         lazy_max=True, narrow=True, profile=(), interpret=False):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  if interpret and jax.local_device_count() < 3:
    raise ValueError("Mosaic GPU's interpret mode runs the kernel's 3 warpgroups as threads that wait on "
                     "one another, one host device each: it needs >= 3 devices, or it deadlocks (on CPU: "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=4; `make test` sets 8)")
  split = layout is not None and layout.block_q == SPLIT_Q
  _, _, tp = _query_blocks(t, split)
  sp = max(pl.cdiv(s, block_k), 1) * block_k
  if split:  # a shared window loads SHARED keys
    sp = max(sp, SHARED)
  tq = t if t >= TILE_Q and t % ALIGN == 0 else tp   # rows of q / out (Geometry.t_rows): TMA tiles
                                                    # rows by 8 and reads at most a tile past them
  g = Geometry(b=b, t_padded=tp, t_rows=tq, h=h, kv_heads=kh, d=d, s_valid=s, s_padded=sp, block_k=block_k,
               stages=stages, causal=causal, ranges=layout is not None, columns=columns is not None,
               heads_fastest=heads_fastest, scale=scale, dtype=q_BTHD.dtype, lazy_max=lazy_max,
               narrow=narrow and layout is not None and block_k == 128, split=split, profile=profile,
               interpret=interpret)
  q = _pad_to(q_BTHD, tq, 1)
  k, v = _pad_to(k_BSKD, sp, 1), _pad_to(v_BSKD, sp, 1)
  unread = jnp.zeros((1, 1, 1, 1), jnp.int32)
  meta = lo = hi = kc = vc = thr = colmap = unread
  if layout is not None:
    meta, lo, hi, thr, colmap, srt = _ranges_inputs(layout, columns, k, t=t, s=s, h=h, block_k=block_k,
                                                    causal=causal, split=split)
    if columns is not None:
      kc, vc = _gather_columns(k, srt, h), _gather_columns(v, srt, h)
  out, lse = call_kernel(g, (q, k, v, meta, lo, hi, kc, vc, thr, colmap))
  return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))


def _check_served(q_BTHD, stages: int, interpret: bool) -> None:
  """ValueError for bad knobs; `dispatch.Unsupported` for calls this kernel does not serve."""
  if not isinstance(stages, int) or isinstance(stages, bool) or stages < 2:
    raise ValueError(f"stages must be an int >= 2, got {stages!r}")
  if interpret:
    raise dispatch.Unsupported("interpret mode: the Triton kernel serves it (this kernel's tests run it "
                               "in Mosaic GPU's interpret mode through flash_mgpu._run)")
  if hopper_device() is None:
    raise dispatch.Unsupported("the Mosaic GPU (wgmma) kernel needs a Hopper GPU (sm_90)")
  if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
    raise dispatch.Unsupported(f"the Mosaic GPU kernel takes bf16 / f16, got {q_BTHD.dtype}")
  if q_BTHD.shape[-1] not in HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {q_BTHD.shape[-1]} not served by the Mosaic GPU kernel "
                               f"(supported: {HEAD_DIMS})")


def flash_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, *, scale: float, causal: bool = True,
                         window=None, q_segment_ids=None, kv_segment_ids=None, kv_offset: int = 0,
                         q_lengths=None, kv_lengths=None, block_k: int = 128, stages: int = 2,
                         heads_fastest: bool = True, interpret: bool = False, block_q=None, num_warps=None,
                         num_stages=None, _poison=None):
  """Dense attention forward on Hopper. Returns (out [B, T, H, D], lse [B, T, H] float32).
  Serves causal self-attention (S == T) and full attention; the other mask features raise
  `dispatch.Unsupported` (the Triton kernel serves them), as do the Triton kernel's knobs
  (block_q, num_warps, num_stages, _poison) when set."""
  dispatch.triton_only(block_q=block_q, num_warps=num_warps, num_stages=num_stages, _poison=_poison)
  check_attention_args(q_BTHD, k_BSKD, v_BSKD, scale=scale, causal=causal, window=window,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       kv_offset=kv_offset, q_lengths=q_lengths, kv_lengths=kv_lengths)
  if block_k not in (64, 128):
    raise ValueError(f"block_k must be 64 or 128 for the Mosaic GPU kernel, got {block_k!r}")
  _check_served(q_BTHD, stages, interpret)
  extras = dict(window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_lengths=q_lengths, kv_lengths=kv_lengths)
  used = [name for name, x in extras.items() if x is not None] + (["kv_offset"] if kv_offset else [])
  if used:
    raise dispatch.Unsupported(f"the Mosaic GPU flash kernel has no {', '.join(used)}")
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  if t == 0 or s == 0:
    raise dispatch.Unsupported(f"empty sequence (T={t}, S={s})")
  if causal and s != t:
    raise dispatch.Unsupported(f"causal with S != T (T={t}, S={s}) needs kv_offset: Triton kernel")
  return _run(q_BTHD, k_BSKD, v_BSKD, None, None, scale=float(scale), causal=bool(causal),
              block_k=block_k, stages=stages, heads_fastest=bool(heads_fastest))


def block_sparse_attention_mgpu(q_BTHD, k_BSKD, v_BSKD, layout, *, scale: float, causal: bool = True,
                                columns=None, interpret: bool = False, stages: int = 2,
                                heads_fastest: bool = True, column_chunk=None, num_warps=None,
                                num_stages=None, _poison=None):
  """Block-sparse / key-range attention forward on Hopper (BlockSparse or KeyRanges layouts of
  block_q x block_k 128x64, 128x128, or 56x64 for split mode, the fastest for vertical-slash sets
  with far slashes; columns as one ascending list per head). Returns (out [B, T, H, D], lse
  [B, T, H] float32). Other layouts and column lists, and the Triton kernel's knobs when set:
  `dispatch.Unsupported`."""
  dispatch.triton_only(column_chunk=column_chunk, num_warps=num_warps, num_stages=num_stages, _poison=_poison)
  check_block_sparse_args(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=scale, causal=causal)
  # a layout's blocks are the layout's, not knobs: one this kernel lacks falls through (Triton)
  if (layout.block_q, layout.block_k) not in LAYOUT_BLOCKS:
    raise dispatch.Unsupported(
        f"the Mosaic GPU kernel takes layouts of block_q x block_k "
        f"{', '.join(f'{q}x{k}' for q, k in LAYOUT_BLOCKS)} ({SPLIT_Q}x64: split mode), "
        f"got {layout.block_q}x{layout.block_k}")
  _check_served(q_BTHD, stages, interpret)
  if columns is not None and not (columns.ascending and columns.index.shape[2] == 1):
    raise dispatch.Unsupported("the Mosaic GPU kernel takes gathered columns as one ascending list "
                               "per head (Columns.ascending, as the vertical-slash builders make); "
                               "the Triton block-sparse kernel serves the others")
  return _run(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=float(scale), causal=bool(causal),
              block_k=layout.block_k, stages=stages, heads_fastest=bool(heads_fastest))


# First in the default order: on a Hopper GPU it is the fastest kernel (benchmarks/results); any
# call it does not serve (no Hopper, interpret mode, masks it lacks) falls through to "triton".
dispatch.register("flash_attention", "mosaic_gpu", flash_attention_mgpu, first=True)
dispatch.register("block_sparse_attention", "mosaic_gpu", block_sparse_attention_mgpu, first=True)
