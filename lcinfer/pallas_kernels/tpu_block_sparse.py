"""Block-sparse attention forward for TPUs (Pallas Mosaic TPU), with the block lists scalar-prefetched
into SMEM so that they drive the K/V DMAs (the splash-attention scheme, Pallas TPU docs "Scalar
prefetch"), plus the flash forward built on it: the blocks each query block may see (causal
diagonal shifted by kv_offset, window start), with every mask of the Triton kernel (causal,
sliding window, segment ids, kv_offset, per-row lengths).

    out_BTHD, lse_BTH = tpu_block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, layout, scale=...,
                                                   causal=True, interpret=False)
    out_BTHD, lse_BTH = tpu_flash_attention(q_BTHD, k_BSKD, v_BSKD, scale=..., causal=True)

Same semantics as the GPU kernel (`sparse_index.py` / `vertical_slash.py`: union of listed blocks
or key ranges and gathered columns, causal, out-of-range and repeated entries ignored after
canonicalization). Design:
  * grid (B, H, nq, max_blocks); the last axis walks the query block's list ("arbitrary": a
    reduction with VMEM scratch m, l, acc carried across it), the others are "parallel".
  * The K/V index_map reads the prefetched list: step j loads KV block list[j] of kv head h // G
    (GQA without repeats). Steps j >= count reuse the last listed block index, so no new DMA is
    issued, and their compute is skipped with pl.when. `KeyRanges` (unaligned, MInference-style)
    load block_k keys from an element offset (`pl.Element`) and mask keys outside [lo, hi);
    unaligned DMAs are untested on TPU hardware.
  * Gathered columns (MInference's vertical lines): their K/V rows are gathered once per call in
    XLA into [B, H, 1 or nq, n, D] (a list shared by a head's query blocks, or one per query
    block: nq times the bytes), and walked block_k at a time in grid steps after the block list.
    A column's step masks entries past the query block's column count, dropped entries (-1),
    columns above the diagonal, and columns inside a listed block or range (counted there: a loop
    over the query block's list, read from SMEM).
  * Online softmax in float32 (FlashAttention-2, Algorithm 1); lse in natural log, -inf and out 0
    for a row that sees nothing.
  * TPU tiles: arrays are moved to [B, H, T, D] so that a block's last two dims are (rows, D);
    block_q and block_k are multiples of 128 on hardware (any power of two >= 8 in interpret mode).
Tested in TPU interpret mode on CPU (`interpret=True` selects `pltpu.InterpretParams()`); no TPU
has run it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.reference import check_attention_args, check_block_sparse_args
from lcinfer.pallas_kernels.sparse_index import BlockSparse, canonicalize
from lcinfer.pallas_kernels.vertical_slash import canonicalize_ranges

NEG_INF = float("-inf")


# -- the online softmax of the TPU kernels (FlashAttention-2, Algorithm 1, natural log), carried in
# VMEM scratch m, l [rows, 1] and acc [rows, D] across the grid's last ("arbitrary") axis ---------
def init_scratch(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def qk_logits(q, k, scale):
  """q [R, D] . k [N, D]^T * scale in float32."""
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None) * scale


def online_update(s, v, m_sc, l_sc, acc_sc):
  """Folds masked logits s [R, N] (-inf: not attended) and values v [N, D] into the scratch."""
  m_prev = m_sc[...]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
      p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
      precision=lax.Precision.HIGHEST if v.dtype == jnp.float32 else None)
  m_sc[...] = m_next


def finish_scratch(m_sc, l_sc, acc_sc):
  """(out [R, D] float32, lse [R, 1]): out 0 and lse -inf for a row that saw nothing."""
  l = l_sc[...]
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return acc_sc[...] / l_safe, jnp.where(seen, m_sc[...] + jnp.log(l_safe), NEG_INF)


def _kernel(count_ref, ld_ref, lo_ref, hi_ref, len_ref, ccount_ref, q_ref, k_ref, v_ref, *refs, scale, causal,
            block_q, max_blocks, steps, aliased, kv_offset, window, segments, lengths, has_cols):
  if segments:
    qseg_ref, kvseg_ref, *refs = refs
  if has_cols:
    kc_ref, vc_ref, cpos_ref, *refs = refs
  if aliased:
    refs = refs[2:]  # the poisoned buffers aliased to the outputs; never read
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  b, h, qi, j = (pl.program_id(i) for i in range(4))
  n = count_ref[b, h, qi]

  pl.when(j == 0)(lambda: init_scratch(m_sc, l_sc, acc_sc))

  @pl.when(j < n)
  def _step():
    ld, lo, hi = ld_ref[b, h, qi, j], lo_ref[b, h, qi, j], hi_ref[b, h, qi, j]
    s = qk_logits(q_ref[...], k_ref[...], scale)
    k_pos = ld + lax.broadcasted_iota(jnp.int32, s.shape, 1)   # the loaded keys; [lo, hi) are listed
    mask = (k_pos >= lo) & (k_pos < hi)
    q_row = qi * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    q_pos = kv_offset + q_row                            # chunked prefill: queries after the cache
    if causal:
      mask = mask & (k_pos <= q_pos)
    if window is not None:
      mask = mask & (q_pos - window < k_pos)
    if segments:                                         # packed prompts: [bq, 1] against [1, bk]
      mask = mask & (qseg_ref[...] == kvseg_ref[...])
    if lengths:
      mask = mask & (q_row < len_ref[b, 0]) & (k_pos < len_ref[b, 1])
    online_update(jnp.where(mask, s, NEG_INF), v_ref[...], m_sc, l_sc, acc_sc)

  if has_cols:  # steps past the block list: chunks of gathered columns (the vertical part)
    c = j - max_blocks
    chunk = kc_ref.shape[0]

    @pl.when((c >= 0) & (c * chunk < ccount_ref[b, h, qi]))
    def _columns():
      cpos = cpos_ref[...]                                                    # [1, chunk] key positions
      slot = c * chunk + lax.broadcasted_iota(jnp.int32, cpos.shape, 1)
      ok = (slot < ccount_ref[b, h, qi]) & (cpos >= 0)                        # -1: dropped entries

      def inside(m, hit):  # a column inside a listed block or range is counted there already
        return hit | ((cpos >= lo_ref[b, h, qi, m]) & (cpos < hi_ref[b, h, qi, m]))
      ok = ok & ~lax.fori_loop(0, n, inside, jnp.zeros(cpos.shape, jnp.bool_))
      s = qk_logits(q_ref[...], kc_ref[...], scale)
      mask = jnp.broadcast_to(ok, s.shape)
      if causal:
        q_pos = kv_offset + qi * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        mask = mask & (cpos <= q_pos)
      online_update(jnp.where(mask, s, NEG_INF), vc_ref[...], m_sc, l_sc, acc_sc)

  @pl.when(j == steps - 1)
  def _finish():
    out, lse_ref[...] = finish_scratch(m_sc, l_sc, acc_sc)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "interpret", "poison", "kv_offset", "window"))
def _tpu_block_sparse(q_BTHD, k_BSKD, v_BSKD, layout, q_seg=None, kv_seg=None, lens=None, columns=None, *,
                      scale, causal, interpret, poison, kv_offset=0, window=None):
  """The kernel over a layout. The flash path's extras: kv_offset (static; queries at positions
  kv_offset + row), window (static), segment ids q_seg [B, T] / kv_seg [B, S] (aligned layouts),
  lens [B, 2] int32 (valid query rows, valid keys). The block-sparse path's: gathered columns."""
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  bq, bk = layout.block_q, layout.block_k
  nq, nk = pl.cdiv(t, bq), pl.cdiv(s, bk)
  aligned = isinstance(layout, BlockSparse)
  if aligned:   # (the causal clip of the lists assumes kv_offset 0; the kernel masks either way)
    layout, columns = canonicalize(layout, columns, t, s, causal and kv_offset == 0)
    count, lo = layout.count, layout.kv_block_idx * bk
    hi = jnp.minimum(lo + bk, s)
  else:  # key ranges at any offset: loaded through element-offset block specs
    lo, hi, count, _, columns = canonicalize_ranges(layout, columns, t, s, causal)
  mb = max(1, lo.shape[-1])
  q = jnp.pad(jnp.transpose(q_BTHD, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, nq * bq - t), (0, 0)))
  k = jnp.pad(jnp.transpose(k_BSKD, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, nk * bk - s), (0, 0)))
  v = jnp.pad(jnp.transpose(v_BSKD, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, nk * bk - s), (0, 0)))
  count = count.astype(jnp.int32)
  if lo.shape[-1] == 0:
    lo = hi = jnp.zeros(lo.shape[:-1] + (1,), jnp.int32)
  ld = jnp.minimum(lo, nk * bk - bk).astype(jnp.int32)  # a load start that stays in bounds
  # steps past the count repeat the last listed load: same block, no new DMA
  last = jnp.take_along_axis(ld, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  ld = jnp.where(jnp.arange(mb) < count[..., None], ld, last)

  last_step = lambda j: jnp.minimum(j, mb - 1)  # noqa: E731  (column steps keep the last block: no DMA)
  if aligned:
    kv_block = (None, None, bk, d)

    def kv_map(bi, hh, qi, j, count_ref, ld_ref, *_):
      return (bi, hh // g, ld_ref[bi, hh, qi, last_step(j)] // bk, 0)
  else:
    kv_block = (None, None, pl.Element(bk), d)

    def kv_map(bi, hh, qi, j, count_ref, ld_ref, *_):
      return (bi, hh // g, ld_ref[bi, hh, qi, last_step(j)], 0)

  segments = q_seg is not None
  if segments and not aligned:
    raise ValueError("segment ids go with grid-aligned (BlockSparse) layouts")
  lengths = lens is not None
  lens = jnp.asarray(lens if lengths else jnp.zeros((b, 2)), jnp.int32)
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi, j, *_: (bi, hi, qi, 0)),
               pl.BlockSpec((None, None, bq, 1), lambda bi, hi, qi, j, *_: (bi, hi, qi, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, h, nq * bq, d), q.dtype),
               jax.ShapeDtypeStruct((b, h, nq * bq, 1), jnp.float32)]
  in_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi, j, *_: (bi, hi, qi, 0)),
              pl.BlockSpec(kv_block, kv_map),
              pl.BlockSpec(kv_block, kv_map)]
  has_cols = columns is not None
  ccount = columns.count.astype(jnp.int32) if has_cols else jnp.zeros_like(count)
  args = [count, ld, lo.astype(jnp.int32), hi.astype(jnp.int32), lens, ccount, q, k, v]
  if segments:  # query ids as [rows, 1] blocks, key ids as [1, keys] blocks (lanes), padding never matches
    args += [jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, nq * bq - t)), constant_values=-1)[:, :, None],
             jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, nk * bk - s)), constant_values=-2)[:, None, :]]
    in_specs += [pl.BlockSpec((None, bq, 1), lambda bi, hi, qi, j, *_: (bi, qi, 0)),
                 pl.BlockSpec((None, 1, bk), lambda bi, hi, qi, j, count_ref, ld_ref, *_:
                              (bi, 0, ld_ref[bi, hi, qi, last_step(j)] // bk))]
  nc = 0
  if has_cols:  # K/V rows of the columns gathered once per call (per head, or per query block)
    cols = columns.index.astype(jnp.int32)                       # [B, H, 1 or nq, n]; -1: dropped
    nc = max(1, pl.cdiv(cols.shape[-1], bk))
    cols = jnp.pad(cols, ((0, 0), (0, 0), (0, 0), (0, nc * bk - cols.shape[-1])), constant_values=-1)
    shared = cols.shape[2] == 1
    bidx, kvh = jnp.arange(b)[:, None, None, None], (jnp.arange(h) // g)[None, :, None, None]
    safe = jnp.where(cols >= 0, cols, 0)
    args += [k[bidx, kvh, safe], v[bidx, kvh, safe], cols[:, :, :, None, :]]   # [B, H, Nq, n, D], positions

    def chunk(bi, hh, qi, j, count_ref, ld_ref, lo_ref, hi_ref, len_ref, ccount_ref):
      # steps before the columns load chunk 0; past the count, the last (no new DMA)
      last = jnp.maximum(pl.cdiv(ccount_ref[bi, hh, qi], bk) - 1, 0)
      return jnp.clip(j - mb, 0, last)
    in_specs += [pl.BlockSpec((None, None, None, bk, d), lambda bi, hh, qi, j, *pf:
                              (bi, hh, 0 if shared else qi, chunk(bi, hh, qi, j, *pf), 0))] * 2
    in_specs.append(pl.BlockSpec((None, None, None, 1, bk), lambda bi, hh, qi, j, *pf:
                                 (bi, hh, 0 if shared else qi, 0, chunk(bi, hh, qi, j, *pf))))
  aliases = {}
  if poison is not None:  # testing hook: outputs start poisoned; an unwritten element keeps it
    aliases = {len(args): 0, len(args) + 1: 1}
    args += [jnp.full(o.shape, poison, o.dtype) for o in out_shape]
    in_specs += out_specs
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6, grid=(b, h, nq, mb + nc), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  kernel = functools.partial(_kernel, scale=scale, causal=causal, block_q=bq, max_blocks=mb, steps=mb + nc,
                             aliased=poison is not None, kv_offset=kv_offset, window=window,
                             segments=segments, lengths=lengths, has_cols=has_cols)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="lcinfer_tpu_block_sparse_fwd")(*args)
  out = jnp.transpose(out[:, :, :t], (0, 2, 1, 3))
  lse = jnp.transpose(lse[:, :, :t, 0], (0, 2, 1))
  return out, lse


def _on_tpu() -> bool:
  try:
    return jax.devices()[0].platform == "tpu"
  except RuntimeError:
    return False


def _check_blocks(bq, bk, interpret):
  for name, x in (("block_q", bq), ("block_k", bk)):
    if not isinstance(x, int) or x < 8 or x & (x - 1):   # a layout's blocks: other kernels may serve them
      raise dispatch.Unsupported(f"layout.{name} must be a power of two >= 8 for the TPU kernel, got {x!r}")
    if not interpret and x % 128:
      raise dispatch.Unsupported(f"{name} = {x}: TPU tiles need multiples of 128 (use 128 or more)")


def tpu_block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, layout: BlockSparse, *, scale: float,
                               causal: bool = True, columns=None, interpret: bool = False,
                               _poison: float | None = None, **unused):
  """Block-sparse attention on a TPU (or in TPU interpret mode on CPU), over a `BlockSparse` or
  `KeyRanges` layout plus optional gathered `Columns` (module docstring). Returns (out [B,T,H,D],
  lse [B,T,H] float32)."""
  del unused
  check_block_sparse_args(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=scale, causal=causal)
  if not interpret and not _on_tpu():
    raise dispatch.Unsupported("the TPU block-sparse kernel needs a TPU; pass interpret=True to run "
                               "it in TPU interpret mode on CPU")
  _check_blocks(layout.block_q, layout.block_k, interpret)
  if q_BTHD.shape[1] == 0 or k_BSKD.shape[1] == 0:
    raise dispatch.Unsupported("empty sequence")
  return _tpu_block_sparse(q_BTHD, k_BSKD, v_BSKD, layout, columns=columns, scale=float(scale),
                           causal=bool(causal), interpret=bool(interpret), poison=_poison)


def causal_layout(b: int, h: int, t: int, s: int, block_q: int, block_k: int, causal: bool,
                  kv_offset: int = 0, window: int | None = None) -> BlockSparse:
  """Every KV block a query block may see: up to its last query's position (kv_offset + row) when
  causal, from its first query's window start with a window, all of them otherwise."""
  nq, nk = pl.cdiv(t, block_q), pl.cdiv(s, block_k)
  q0 = jnp.arange(nq, dtype=jnp.int32) * block_q
  q1 = jnp.minimum(q0 + block_q, t) - 1
  last = jnp.minimum((kv_offset + q1) // block_k, nk - 1) if causal else jnp.full((nq,), nk - 1, jnp.int32)
  first = jnp.zeros((nq,), jnp.int32)
  if window is not None:
    first = jnp.maximum(kv_offset + q0 - window + 1, 0) // block_k
  count = jnp.where(causal & (kv_offset + q1 < 0), 0, jnp.maximum(last - first + 1, 0))
  # list width = grid steps per query block: a window of w keys spans at most block_q + w - 1 keys
  width = nk if window is None else min(nk, pl.cdiv(block_q + window - 1, block_k) + 1)
  idx = jnp.minimum(first[:, None] + jnp.arange(width, dtype=jnp.int32), nk - 1)
  return BlockSparse(jnp.minimum(jnp.broadcast_to(count, (b, h, nq)), width),
                     jnp.broadcast_to(idx, (b, h, nq, width)), block_q, block_k)


def tpu_flash_attention(q_BTHD, k_BSKD, v_BSKD, *, scale: float, causal: bool = True, window=None,
                        q_segment_ids=None, kv_segment_ids=None, kv_offset: int = 0, q_lengths=None,
                        kv_lengths=None, block_q: int | None = None, block_k: int | None = None,
                        interpret: bool = False, _poison: float | None = None, **unused):
  """Dense flash forward on TPU: the block-sparse kernel over the blocks each query block may see
  (`causal_layout`: the causal diagonal shifted by kv_offset, and the window's start, so blocks
  outside them are never loaded), with every mask of the Triton kernel: causal, sliding window,
  segment ids (packed prompts), kv_offset (chunked prefill against a cache: query row i sits at
  position kv_offset + i), q_lengths / kv_lengths (masked tails per batch row). A row that sees
  nothing gets out 0, lse -inf."""
  del unused
  check_attention_args(q_BTHD, k_BSKD, v_BSKD, scale=scale, causal=causal, window=window,
                       q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, kv_offset=kv_offset,
                       q_lengths=q_lengths, kv_lengths=kv_lengths)
  b, t, h, _ = q_BTHD.shape
  s = k_BSKD.shape[1]
  if not interpret and not _on_tpu():
    raise dispatch.Unsupported("the TPU flash kernel needs a TPU; pass interpret=True to run it in TPU "
                               "interpret mode on CPU")
  if t == 0 or s == 0:
    raise dispatch.Unsupported("empty sequence")
  bq = block_q or (128 if t >= 128 or not interpret else max(8, 1 << (max(t, 1) - 1).bit_length()))
  bk = block_k or (128 if s >= 128 or not interpret else max(8, 1 << (max(s, 1) - 1).bit_length()))
  _check_blocks(bq, bk, interpret)
  layout = causal_layout(b, h, t, s, bq, bk, causal, int(kv_offset), window)
  lens = None
  if q_lengths is not None or kv_lengths is not None:
    lens = jnp.stack([jnp.full((b,), t, jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32),
                      jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)],
                     axis=-1)
  return _tpu_block_sparse(q_BTHD, k_BSKD, v_BSKD, layout, q_segment_ids, kv_segment_ids, lens,
                           scale=float(scale), causal=bool(causal), interpret=bool(interpret), poison=_poison,
                           kv_offset=int(kv_offset), window=window)


dispatch.register("block_sparse_attention", "tpu", tpu_block_sparse_attention)
dispatch.register("flash_attention", "tpu", tpu_flash_attention)
