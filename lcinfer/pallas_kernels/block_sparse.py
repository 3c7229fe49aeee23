"""Block-sparse attention forward as a Pallas kernel for GPUs, Triton lowering.

    out_BTHD, lse_BTH = block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, layout, scale=d ** -0.5,
                                               causal=True, columns=None, interpret=False)

`layout` is a `sparse_index.BlockSparse` (per batch, head, query block: a count and a padded list
of grid-aligned KV blocks) or a `vertical_slash.KeyRanges` (key ranges of at most block_k keys at
any offset: MInference's slash runs); `columns` an optional `sparse_index.Columns` (gathered key
columns: the vertical part of vertical-slash). Key-set semantics: sparse_index.py and
vertical_slash.py (union of listed blocks / ranges and columns, causal, entries beyond count and
out-of-range entries ignored). Design:
  * The layout is first canonicalized on device (`sparse_index.canonicalize` or
    `vertical_slash.canonicalize_ranges`: sorted, disjoint, in range, causally clipped; columns
    minus listed keys), so the kernel trusts its lists and never double counts a key. Both become
    (lo, hi) key ranges of at most block_k keys.
  * One program per (query block, batch, query head); K/V refs span the whole (padded) sequence of
    kv head h // G (GQA through the index_map, no repeat); `fori_loop` over the listed ranges with
    run-time offsets `pl.ds(start, block_k)` (start = lo, kept in bounds for unaligned ranges;
    keys outside [lo, hi) masked).
  * Online softmax in float32 (exp2). The ranges that every row of the query block sees whole
    (block_k keys left of the diagonal, not the padded tail; listed first) run without masks; the
    rest get the range, causal and tail masks by index (lengths padded in the wrapper).
  * Then the columns, `column_chunk` at a time: K/V rows gathered by index (`k_ref[cols, :]`),
    entries beyond the column count and columns inside a listed range masked (the check runs in
    the kernel against the query block's range list), merged into the same online softmax. A
    column list may be per query block or one sorted list per head (index [B, H, 1, n]) of which
    each query block takes the prefix up to its last row.
  * A query that sees nothing: out = 0, lse = -inf.
Blocks must be powers of two >= 16 (Triton tiles); head_dim 64 or 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels.launch import triton_call
from lcinfer.pallas_kernels.flash_triton import (MIN_BLOCK, SUPPORTED_HEAD_DIMS, _check_block,
                                                 _gpu_backend, _next_pow2)
from lcinfer.pallas_kernels.reference import block_sparse_reference, check_block_sparse_args
from lcinfer.pallas_kernels.sparse_index import BlockSparse, Columns, canonicalize
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, canonicalize_ranges



def _kernel(*refs, scale, causal, block_q, block_k, s_valid, s_padded, has_cols, col_chunk, aliased,
            f32_dots, aligned):
  q_ref, k_ref, v_ref, meta_ref, lo_ref, hi_ref = refs[:6]
  rest = refs[6:]
  if has_cols:
    col_ref, *rest = rest
  if aliased:
    rest = rest[2:]  # NaN-filled buffers aliased to the outputs; never read
  o_ref, lse_ref = rest

  qb = pl.program_id(0)
  q_pos = qb * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q = q_ref[...]
  precision = lax.Precision.HIGHEST if f32_dots else None
  qk_scale = scale * osm.LOG2E

  def block_body(j, carry, masked):
    lo = lo_ref[j]
    if aligned:  # grid blocks: the load starts at the range
      start = pl.multiple_of(lo, block_k)
    else:        # a range at any offset: load block_k keys from a start that stays in bounds
      start = jnp.minimum(lo, s_padded - block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    mask = None
    if masked:
      k_pos = start + jnp.arange(block_k, dtype=jnp.int32)
      keep = (k_pos >= lo) & (k_pos < hi_ref[j]) if not aligned else k_pos < hi_ref[j]
      mask = jnp.broadcast_to(keep[None, :], (block_q, block_k))
      if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    return osm.update(carry, osm.logits(q, k, qk_scale, precision), v, mask, precision)

  # The canonical lists start with the ranges every row of the query block sees whole (meta[2] of
  # them: block_k keys, left of the diagonal); they skip the mask arithmetic. Both parts run
  # backwards (nearest the diagonal first), so that the programs in flight sweep the keys together
  # and share them in L2 (see flash_triton).
  carry = osm.init(block_q, q.shape[-1])
  carry = osm.descending(meta_ref[2], meta_ref[0], functools.partial(block_body, masked=True), carry)
  carry = osm.descending(0, meta_ref[2], functools.partial(block_body, masked=False), carry)

  if has_cols:
    ccount = meta_ref[1]
    lo_all, hi_all = lo_ref[...], hi_ref[...]  # [mb]; slots past the count are empty [0, 0)

    def col_body(c, carry):
      off = c * col_chunk
      slot = off + jnp.arange(col_chunk, dtype=jnp.int32)
      cols = col_ref[pl.ds(pl.multiple_of(off, col_chunk), col_chunk)]
      ok = (slot < ccount) & (cols >= 0)  # -1: a dropped entry of a shared list
      cols = jnp.where(ok, cols, 0)       # canonicalized: in range; masked entries read row 0
      # a column inside a listed range is already counted there
      inside = (cols[:, None] >= lo_all[None, :]) & (cols[:, None] < hi_all[None, :])
      ok = ok & (jnp.max(inside.astype(jnp.int32), axis=1) == 0)
      k = k_ref[cols, :]
      v = v_ref[cols, :]
      mask = jnp.broadcast_to(ok[None, :], (block_q, col_chunk))
      if causal:
        mask = mask & (cols[None, :] <= q_pos[:, None])
      return osm.update(carry, osm.logits(q, k, qk_scale, precision), v, mask, precision)

    carry = lax.fori_loop(0, lax.div(ccount + col_chunk - 1, col_chunk), col_body, carry)

  out, lse = osm.finish(carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def prepare_ranges(layout: BlockSparse | KeyRanges, columns: Columns | None, t: int, s: int,
                   causal: bool, align: int = 1):
  """The kernels' form of any layout: (lo, hi [B, H, nq, M] key ranges of at most block_k keys,
  count, n_whole [B, H, nq], columns) canonical (sorted, disjoint, clipped), the n_whole ranges
  that every row of the query block sees whole listed first. Grid blocks become aligned ranges;
  align > 1: every range lies in one `align`-aligned window of block_k keys (see
  `canonicalize_ranges`)."""
  bq, bk = layout.block_q, layout.block_k
  nq = pl.cdiv(t, bq)
  if isinstance(layout, BlockSparse):
    layout, columns = canonicalize(layout, columns, t, s, causal)
    lo = layout.kv_block_idx * bk
    hi = jnp.minimum(lo + bk, s)
    count = layout.count
    # blocks whole for every row of the query block: a prefix of the ascending list
    q0 = (jnp.arange(nq, dtype=jnp.int32) * bq)[:, None]
    whole = (jnp.arange(layout.max_blocks) < count[..., None]) & (lo + bk <= s)
    if causal:
      whole = whole & (lo + bk - 1 <= q0)
    n_whole = jnp.sum(whole, axis=-1)
    return lo, hi, count, n_whole, columns
  return canonicalize_ranges(layout, columns, t, s, causal, align)


@functools.partial(jax.jit, static_argnames=(
    "scale", "causal", "col_chunk", "num_warps", "num_stages", "interpret", "poison"))
def _block_sparse(q_BTHD, k_BSKD, v_BSKD, layout, columns, *, scale, causal, col_chunk, num_warps,
                  num_stages, interpret, poison):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  bq, bk = layout.block_q, layout.block_k
  nq, nk = pl.cdiv(t, bq), pl.cdiv(s, bk)
  tp, sp = nq * bq, nk * bk
  aligned = isinstance(layout, BlockSparse)
  lo, hi, count, n_whole, columns = prepare_ranges(layout, columns, t, s, causal)
  q = jnp.pad(q_BTHD, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  k = jnp.pad(k_BSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  v = jnp.pad(v_BSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  has_cols = columns is not None

  def pad_last(x, n):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])

  listed = jnp.arange(lo.shape[-1]) < count[..., None]
  lo, hi = jnp.where(listed, lo, 0), jnp.where(listed, hi, 0)  # slots past the count: empty
  mb = _next_pow2(max(1, lo.shape[-1]))
  ccount = columns.count if has_cols else jnp.zeros_like(count)
  meta = jnp.stack([count, ccount, n_whole], axis=-1).astype(jnp.int32)   # [B, H, nq, 3]

  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
  lse_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  in_specs = [q_spec, kv_spec, kv_spec,
              pl.BlockSpec((None, None, None, 3), lambda i, bi, hi: (bi, hi, i, 0)),
              pl.BlockSpec((None, None, None, mb), lambda i, bi, hi: (bi, hi, i, 0)),
              pl.BlockSpec((None, None, None, mb), lambda i, bi, hi: (bi, hi, i, 0))]
  args = [q, k, v, meta, pad_last(lo.astype(jnp.int32), mb), pad_last(hi.astype(jnp.int32), mb)]
  if has_cols:
    mc = pl.cdiv(max(1, columns.max_cols), col_chunk) * col_chunk
    args.append(pad_last(columns.index, mc))
    shared = columns.index.shape[2] == 1  # one list per head, a prefix of it per query block
    in_specs.append(pl.BlockSpec((None, None, None, mc),
                                 lambda i, bi, hi: (bi, hi, 0 if shared else i, 0)))
  out_shape = [jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
               jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  kernel = functools.partial(
      _kernel, scale=scale, causal=causal, block_q=bq, block_k=bk, s_valid=s, s_padded=sp,
      has_cols=has_cols, col_chunk=col_chunk, aliased=poison is not None,
      f32_dots=q.dtype == jnp.float32, aligned=aligned)
  out, lse = triton_call(kernel, args, grid=(nq, b, h), in_specs=in_specs, out_specs=[q_spec, lse_spec],
                         out_shape=out_shape, num_warps=num_warps, num_stages=num_stages,
                         interpret=interpret, name="lcinfer_block_sparse_fwd", poison=poison)
  return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))


def block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, layout: BlockSparse | KeyRanges, *, scale: float,
                           causal: bool = True, columns: Columns | None = None,
                           column_chunk: int = 32, interpret: bool = False,
                           num_warps: int | None = None, num_stages: int | None = None,
                           _poison: float | None = None):
  """Block-sparse attention forward. Returns (out [B, T, H, D] in q's dtype, lse [B, T, H] f32).

  Raises ValueError for malformed calls (shapes, dtypes, layout shapes, block sizes) and
  `dispatch.Unsupported` for valid calls the kernel does not cover (head_dim, no GPU without
  interpret), so that the dispatcher can fall back to "xla" (the reference).
  """
  check_block_sparse_args(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=scale, causal=causal)
  for name in ("block_q", "block_k"):  # the layout's, not knobs: other kernels may serve it (split mode)
    x = getattr(layout, name)
    if x < MIN_BLOCK or x & (x - 1):
      raise dispatch.Unsupported(f"layout.{name} must be a power of two >= {MIN_BLOCK} for the Triton "
                                 f"block-sparse kernel (Triton tiles), got {x}")
  _check_block("column_chunk", column_chunk)
  d = q_BTHD.shape[-1]
  if d not in SUPPORTED_HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {d} is not supported by the Triton block-sparse kernel "
                               f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  if q_BTHD.shape[1] == 0 or k_BSKD.shape[1] == 0:
    raise dispatch.Unsupported("empty sequence")
  if not interpret and _gpu_backend() is None:
    raise dispatch.Unsupported("the Triton block-sparse kernel needs a CUDA GPU; pass "
                               "interpret=True to run it on CPU")
  return _block_sparse(q_BTHD, k_BSKD, v_BSKD, layout, columns, scale=float(scale),
                       causal=bool(causal), col_chunk=column_chunk,
                       num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages or 3,
                       interpret=bool(interpret), poison=_poison)


dispatch.register("block_sparse_attention", "triton", block_sparse_attention)
dispatch.register("block_sparse_attention", "xla", block_sparse_reference)
