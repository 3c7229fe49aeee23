"""Flash-decoding for TPUs (Pallas Mosaic TPU): the GPU kernel's split-K scheme (Dao, Haziza, Massa,
Sizov 2023, "Flash-Decoding for long-context inference") over lcinfer's cache layout, with the
pipelined BlockSpec loads of Mosaic TPU instead of a loop over a whole-cache ref; over bf16 caches
and over the quantized layouts of `quant.py` (KIVI, Liu et al. 2024: int8 / int4 / int2 codes, per
token or per channel scales, plus the full-precision residual window merged by lse).

    out_BTHD, lse_BTH = tpu_decode_attention(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale=d ** -0.5,
                                             window=None, num_splits=None, block_k=None, interpret=False)
    out_BTHD, lse_BTH = tpu_quantized_decode_attention(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=...,
                                                       window=None, residual=None, interpret=False)

Semantics as `decode.decode_attention` (masks from positions only: a key at pos p is visible to a
query at q iff p >= 0, q >= 0, p <= q and, with a window, q - p < window). Design:
  * grid (B, K, num_splits, blocks per split); the last axis walks a split's blocks ("arbitrary": a
    reduction with VMEM scratch m, l, acc carried across it), the others are "parallel". Block j of
    split s is cache block s * bps + j; steps past a short last split repeat its last block index
    (no new DMA) and skip their compute with pl.when.
  * GQA without repeats: the G = H / K query heads of a kv head and the T queries form the rows of
    one [R, D] query tile (R = G * T padded to a multiple of 8 sublanes; padded rows have position
    -1 and see nothing) that shares every K/V block.
  * Online softmax in float32 (FlashAttention-2, Algorithm 1, natural log); each split writes a
    partial (out, lse), combined exactly by lse in jnp (`combine.combine_splits`).
  * Quantized caches: a block's packed codes (bits / 16 of the bf16 bytes) and the scale / zero rows
    its keys use are the block's loads; the block is unpacked plane by plane and dequantized
    elementwise in VMEM (code * scale + zero, VPU work), then attended as a bf16 block (the MXU
    products as above). Per-channel token groups must nest with block_k (one divides the other).
  * TPU tiles: block_k is a multiple of 128 on hardware (the positions' lane dimension); any power of
    two >= 16 in interpret mode. A capacity that block_k does not divide is padded (a copy).
Tested in TPU interpret mode on CPU (`interpret=True` selects `pltpu.InterpretParams()`); no TPU
has run it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.combine import combine_splits, from_kv_head_rows
from lcinfer.pallas_kernels.decode import _check_args, _check_knobs, kv_head_rows
from lcinfer.pallas_kernels.quant import QuantizedTensor
from lcinfer.pallas_kernels.tpu_block_sparse import _on_tpu, finish_scratch, init_scratch, online_update, qk_logits

NEG_INF = float("-inf")
MAX_ROWS = 1024   # G * T rows of one query tile (its f32 accumulator lives in VMEM)
TPU_BLOCK_K = 512


def _dequantized(refs, layout, dtype):
  """A K or V block [bk, D] in `dtype` from its refs: the block itself, or (layout = (bits, axis,
  group, block_k)) its packed codes [bk, D * bits / 8] with their scales and zeros, unpacked plane
  by plane (plane i holds channels i * D / f + j: the planes side by side are the channels in
  order) and dequantized elementwise, code * scale + zero (quant.py)."""
  if layout is None:
    return refs[0][...]
  codes_ref, scale_ref, zero_ref = refs
  bits, axis, group, bk = layout
  raw = codes_ref[...].astype(jnp.int32)
  mask = (1 << bits) - 1
  codes = jnp.concatenate([(raw >> (i * bits)) & mask for i in range(8 // bits)], axis=1).astype(jnp.float32)
  scale, zero = scale_ref[...].astype(jnp.float32), zero_ref[...].astype(jnp.float32)
  reps = group if axis == "token" else min(group, bk)   # channel groups nest with blocks (wrapper)
  scale, zero = (jnp.repeat(x, reps, axis=1 if axis == "token" else 0) for x in (scale, zero))
  return (codes * scale + zero).astype(dtype)


def _kernel(q_ref, qpos_ref, *refs, scale, window, blocks_per_split, num_blocks, layouts, aliased):
  n_k = 1 if layouts[0] is None else 3
  n_v = 1 if layouts[1] is None else 3
  k_refs, v_refs, (pos_ref, *refs) = refs[:n_k], refs[n_k:n_k + n_v], refs[n_k + n_v:]
  if aliased:
    refs = refs[2:]  # the poisoned buffers aliased to the outputs; never read
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  split, j = pl.program_id(2), pl.program_id(3)

  pl.when(j == 0)(lambda: init_scratch(m_sc, l_sc, acc_sc))

  @pl.when(split * blocks_per_split + j < num_blocks)   # the last split may be short
  def _step():
    q = q_ref[...]                                        # [R, D]
    k, v = _dequantized(k_refs, layouts[0], q.dtype), _dequantized(v_refs, layouts[1], q.dtype)
    s = qk_logits(q, k, scale)
    k_pos = pos_ref[...]                                  # [1, bk]; -1: an empty slot
    k_pos = jnp.where(k_pos >= 0, k_pos, jnp.iinfo(jnp.int32).max)
    q_pos = qpos_ref[...]                                 # [R, 1]; -1: a padded row, sees nothing
    mask = k_pos <= q_pos
    if window is not None:
      mask = mask & (q_pos - k_pos < window)
    online_update(jnp.where(mask, s, NEG_INF), v, m_sc, l_sc, acc_sc)

  @pl.when(j == blocks_per_split - 1)
  def _finish():
    o_ref[...], lse_ref[...] = finish_scratch(m_sc, l_sc, acc_sc)


def _cache_specs(x, block_k, block):
  """(arrays, BlockSpecs, layout) of a K or V cache: a [B, K, C, D] array in blocks of block_k
  keys, or a QuantizedTensor's codes in the same blocks plus the scale / zero rows those keys use
  (per token: [bk, D / group]; per channel: [max(1, bk / group), D], one token group's row when
  the block lies in one group)."""
  if not isinstance(x, QuantizedTensor):
    return [x], [pl.BlockSpec((None, None, block_k, x.shape[-1]), lambda bi, ki, si, j: (bi, ki, block(si, j), 0))], None
  codes_spec = pl.BlockSpec((None, None, block_k, x.codes.shape[-1]), lambda bi, ki, si, j: (bi, ki, block(si, j), 0))
  if x.axis == "token":
    spec = pl.BlockSpec((None, None, block_k, x.scale.shape[-1]), lambda bi, ki, si, j: (bi, ki, block(si, j), 0))
  elif x.group >= block_k:   # rows of block_k keys lie in one token group
    spec = pl.BlockSpec((None, None, 1, x.scale.shape[-1]),
                        lambda bi, ki, si, j: (bi, ki, block(si, j) * block_k // x.group, 0))
  else:
    spec = pl.BlockSpec((None, None, block_k // x.group, x.scale.shape[-1]),
                        lambda bi, ki, si, j: (bi, ki, block(si, j), 0))
  return [x.codes, x.scale, x.zero], [codes_spec, spec, spec], (x.bits, x.axis, x.group, block_k)


@functools.partial(jax.jit, static_argnames=("scale", "window", "num_splits", "block_k", "interpret", "poison"))
def _tpu_decode(q_BTHD, k, v, pos_BKC, q_pos_BT, *, scale, window, num_splits, block_k, interpret, poison):
  """k, v: [B, K, C, D] arrays, or QuantizedTensors of that logical shape (C a multiple of block_k)."""
  b, t, h, d = q_BTHD.shape
  kh, c = k.shape[1], k.shape[2]
  rows = (h // kh) * t
  r = pl.cdiv(rows, 8) * 8
  cp = pl.cdiv(c, block_k) * block_k
  nb = cp // block_k
  bps = pl.cdiv(nb, num_splits)          # blocks per split; the last split takes the remainder
  num_splits = pl.cdiv(nb, bps)          # no empty splits
  q, qpos = kv_head_rows(q_BTHD, q_pos_BT, kh, r)                      # [B, K, R, D], [B, R]
  pos = pos_BKC.astype(jnp.int32)
  if cp != c:  # a copy of the whole cache: only for (unquantized) capacities block_k does not divide
    k = jnp.pad(k, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, 0), (0, cp - c)), constant_values=-1)
  pos = pos[:, :, None, :]                                              # [B, K, 1, C]: lanes = slots
  qpos = qpos[:, :, None]                                               # [B, R, 1]

  def block(si, j):  # steps past a short last split: its last block again (no new DMA)
    return jnp.minimum(si * bps + j, nb - 1)

  k_args, k_specs, k_layout = _cache_specs(k, block_k, block)
  v_args, v_specs, v_layout = _cache_specs(v, block_k, block)
  in_specs = [pl.BlockSpec((None, None, r, d), lambda bi, ki, si, j: (bi, ki, 0, 0)),
              pl.BlockSpec((None, r, 1), lambda bi, ki, si, j: (bi, 0, 0)),
              *k_specs, *v_specs,
              pl.BlockSpec((None, None, 1, block_k), lambda bi, ki, si, j: (bi, ki, 0, block(si, j)))]
  out_specs = [pl.BlockSpec((None, None, None, r, d), lambda bi, ki, si, j: (bi, ki, si, 0, 0)),
               pl.BlockSpec((None, None, None, r, 1), lambda bi, ki, si, j: (bi, ki, si, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, kh, num_splits, r, d), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, num_splits, r, 1), jnp.float32)]
  args = [q, qpos, *k_args, *v_args, pos]
  aliases = {}
  if poison is not None:  # testing hook: the partials start poisoned; an unwritten element keeps it
    aliases = {len(args): 0, len(args) + 1: 1}
    args += [jnp.full(o.shape, poison, o.dtype) for o in out_shape]
    in_specs += out_specs
  kernel = functools.partial(_kernel, scale=scale, window=window, blocks_per_split=bps, num_blocks=nb,
                             layouts=(k_layout, v_layout), aliased=poison is not None)
  o_part, lse_part = pl.pallas_call(
      kernel, grid=(b, kh, num_splits, bps), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, 1), jnp.float32),
                      pltpu.VMEM((r, d), jnp.float32)],
      input_output_aliases=aliases,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="lcinfer_tpu_flash_decode")(*args)
  out, lse = from_kv_head_rows(*combine_splits(o_part, lse_part[..., 0], rows), t)
  return out.astype(q_BTHD.dtype), lse


def _check_served(b: int, t: int, c: int, rows: int, interpret: bool) -> None:
  """`dispatch.Unsupported` for the calls neither TPU decode kernel serves."""
  if not interpret and not _on_tpu():
    raise dispatch.Unsupported("the TPU flash-decoding kernel needs a TPU; pass interpret=True to run "
                               "it in TPU interpret mode on CPU")
  if t == 0 or c == 0 or b == 0:
    raise dispatch.Unsupported(f"empty input (B={b}, T={t}, C={c})")
  if rows > MAX_ROWS:
    raise dispatch.Unsupported(f"G*T = {rows} query rows per kv head exceeds {MAX_ROWS}; "
                               "use a prefill kernel for long query chunks")


def _default_block_k(c: int, interpret: bool) -> int:
  """TPU_BLOCK_K, or for a shorter cache the smallest allowed power of two covering it (>= 128 on
  hardware, >= 16 in interpret mode, as `decode_attention` takes)."""
  floor = 16 if interpret else 128
  return max(floor, min(TPU_BLOCK_K, 1 << (max(c, 1) - 1).bit_length()))


def tpu_decode_attention(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, *, scale: float,
                         window: int | None = None, num_splits: int | None = None,
                         block_k: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, interpret: bool = False,
                         _poison: float | None = None):
  """Flash-decoding on a TPU (or in TPU interpret mode on CPU). Returns (out [B, T, H, D] in q's
  dtype, lse [B, T, H] float32). ValueError for malformed calls (as `decode_attention`);
  `dispatch.Unsupported` for calls it does not serve (no TPU without interpret, the Triton kernel's
  knobs num_warps / num_stages when set, block_k not a multiple of 128 on hardware, G*T > MAX_ROWS
  rows, an empty input). num_splits None: one split per (row, kv head) when there are at least
  two of those, else 2 (the cores of a megacore chip)."""
  dispatch.triton_only(num_warps=num_warps, num_stages=num_stages)
  _check_args(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale, window, num_splits, block_k)
  b, t, h, _ = q_BTHD.shape
  kh, c = k_BKCD.shape[1], k_BKCD.shape[2]
  _check_served(b, t, c, (h // kh) * t, interpret)
  block_k = _default_block_k(c, interpret) if block_k is None else block_k
  if not interpret and block_k % 128:
    raise dispatch.Unsupported(f"block_k = {block_k}: TPU tiles need multiples of 128 (use 128 or more)")
  if num_splits is None:
    num_splits = 1 if b * kh >= 2 else 2
  return _tpu_decode(q_BTHD, k_BKCD, v_BKCD, pos_BKC, q_pos_BT, scale=float(scale), window=window,
                     num_splits=min(num_splits, pl.cdiv(c, block_k)), block_k=block_k,
                     interpret=bool(interpret), poison=_poison)


def _quantized_block_k(c: int, groups: list[int], interpret: bool) -> int | None:
  """The largest power of two <= TPU_BLOCK_K (>= 128 on hardware, >= 16 in interpret mode) that
  divides C and nests with every per-channel token group (one divides the other); None if none."""
  bk = TPU_BLOCK_K
  while bk >= (16 if interpret else 128):
    if c % bk == 0 and all(g % bk == 0 or bk % g == 0 for g in groups):
      return bk
    bk //= 2
  return None


def tpu_quantized_decode_attention(q_BTHD, k_q: QuantizedTensor, v_q: QuantizedTensor, pos_BKC, q_pos_BT, *,
                                   scale: float, window: int | None = None, residual=None,
                                   num_splits: int | None = None, block_k: int | None = None,
                                   num_warps: int | None = None, num_stages: int | None = None,
                                   interpret: bool = False, _poison: float | None = None,
                                   _unpack: str | None = None):
  """Flash-decoding over quantized K/V (`quant.py` layouts: bits 8 / 4 / 2, per token or per
  channel) on a TPU, dequantized per block in VMEM, plus the optional full-precision residual window
  (k_BKRD, v_BKRD, pos_BKR) through `tpu_decode_attention`, merged by lse. Returns (out [B, T, H,
  D] in q's dtype, lse [B, T, H] float32). ValueError for malformed calls (as the GPU kernel);
  `dispatch.Unsupported` for the Triton knobs, no TPU without interpret, rows > MAX_ROWS, an empty
  input, or a block_k that does not divide C or nest with the per-channel token groups."""
  from lcinfer.pallas_kernels.decode_quant import _check, merge_residual
  dispatch.triton_only(num_warps=num_warps, num_stages=num_stages, _unpack=_unpack)
  _check(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale, window, residual)
  _check_knobs(num_splits, block_k)
  b, t, h, _ = q_BTHD.shape
  _, kh, c, _ = k_q.shape
  _check_served(b, t, c, (h // kh) * t, interpret)
  groups = [x.group for x in (k_q, v_q) if x.axis == "channel"]
  if block_k is None:
    block_k = _quantized_block_k(c, groups, interpret)
    if block_k is None:
      raise dispatch.Unsupported(f"no block of keys divides C = {c} and nests with the token groups {groups}")
  if c % block_k or any(g % block_k and block_k % g for g in groups):
    raise dispatch.Unsupported(f"block_k {block_k} must divide C = {c} and nest with the token groups {groups}")
  if not interpret and (block_k % 128 or any(g < block_k and (block_k // g) % 8 for g in groups)):
    raise dispatch.Unsupported(f"block_k = {block_k}: TPU tiles need multiples of 128 keys (and of 8 "
                               f"scale rows for token groups {groups})")
  if num_splits is None:
    num_splits = 1 if b * kh >= 2 else 2
  out = _tpu_decode(q_BTHD, k_q, v_q, pos_BKC, q_pos_BT, scale=float(scale), window=window,
                    num_splits=min(num_splits, c // block_k), block_k=block_k, interpret=bool(interpret),
                    poison=_poison)
  return merge_residual(out, q_BTHD, q_pos_BT, residual, scale=scale, window=window, interpret=interpret,
                        poison=_poison, decode=tpu_decode_attention)


dispatch.register("decode_attention", "tpu", tpu_decode_attention)
dispatch.register("quantized_decode_attention", "tpu", tpu_quantized_decode_attention)
