"""Diagonal attention for TPUs (Pallas Mosaic TPU): the far slashes of the exact vertical-slash mode
(`diagonals.py`), row i attending key i - o for each listed offset o, with the offsets
scalar-prefetched into SMEM so that they drive the K/V DMAs (as `tpu_block_sparse.py` does).

    out_BTHD, lse_BTH = tpu_diagonal_attention(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, scale=...,
                                               exclude_columns=cols, interpret=False)

Design:
  * grid (B, H, nq, F): the last axis walks the head's ascending offsets ("arbitrary": m, l, acc in
    VMEM scratch), the others are "parallel". Step j of query block [q0, q0 + bq) loads the bq key
    rows [q0 - o_j, q0 - o_j + bq) of kv head h // G (GQA without repeats) through an
    element-offset block (`pl.Element`) of K and V padded by bq rows in front, so that the window
    of any offset up to the block's last row starts in bounds. Steps past the block's count of such
    offsets repeat the last load (no DMA) and skip their compute.
  * One logit a row (an elementwise product summed over D), online softmax in float32 with one key
    a row (FlashAttention-2's update with N = 1).
  * `exclude_columns` (one shared list per head, each block taking its count's prefix): each key's
    slot in the list is loaded as the same window of a [B, H, bq + S, 1] slot map, and keys whose
    slot is under the block's count are dropped (the block-sparse call counts them).
  * `exclude` ranges and the epilogue merge are not in the kernel: `exclude` raises Unsupported
    (the dispatcher's XLA scan takes it), `merge_with` is merged after the kernel by `merge_attention`.
  * block_q a multiple of 128 on hardware (a power of two >= 8 in interpret mode).
Tested in TPU interpret mode on CPU (`interpret=True` selects `pltpu.InterpretParams()`); no TPU has
run it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.diagonals import _check_args, canonical_offsets, column_slots, merged_with
from lcinfer.pallas_kernels.sparse_index import _last_q_row, count_at_most
from lcinfer.pallas_kernels.tpu_block_sparse import NEG_INF, _check_blocks, _on_tpu, finish_scratch, init_scratch


def _kernel(count_ref, ld_ref, off_ref, ccount_ref, q_ref, k_ref, v_ref, *refs, scale, block_q, steps, has_cols,
            aliased):
  if has_cols:
    slot_ref, *refs = refs
  if aliased:
    refs = refs[2:]  # the poisoned buffers aliased to the outputs; never read
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  b, h, qi, j = (pl.program_id(i) for i in range(4))

  pl.when(j == 0)(lambda: init_scratch(m_sc, l_sc, acc_sc))

  @pl.when(j < count_ref[b, h, qi])
  def _step():
    q = q_ref[...].astype(jnp.float32)
    s = jnp.sum(q * k_ref[...].astype(jnp.float32), axis=1, keepdims=True) * scale      # [bq, 1]
    key = qi * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0) - off_ref[b, h, j]
    ok = key >= 0
    if has_cols:   # a listed column inside the block's prefix is counted by the block-sparse call
      ok = ok & (slot_ref[...] >= ccount_ref[b, h, qi])
    s = jnp.where(ok, s, NEG_INF)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, s)
    m_safe = jnp.where(m_next == NEG_INF, 0.0, m_next)
    alpha, p = jnp.exp(m_prev - m_safe), jnp.exp(s - m_safe)
    l_sc[...] = alpha * l_sc[...] + p
    acc_sc[...] = alpha * acc_sc[...] + p * v_ref[...].astype(jnp.float32)
    m_sc[...] = m_next

  @pl.when(j == steps - 1)
  def _finish():
    out, lse_ref[...] = finish_scratch(m_sc, l_sc, acc_sc)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "interpret", "poison"))
def _tpu_diagonals(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude_columns, *, scale, block_q, interpret, poison):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  bq = block_q
  nq = pl.cdiv(t, bq)
  offs = canonical_offsets(offsets_BHF, s)                                  # [B, H, F] ascending, 2S: none
  f = offs.shape[-1]
  count = count_at_most(offs, _last_q_row(nq, bq, t)).astype(jnp.int32)    # [B, H, nq]: o <= last row
  # the window's first row in K padded by bq rows in front: q0 - o + bq >= 1 for every counted o;
  # steps past the count repeat the last counted start (no new DMA)
  q0 = (jnp.arange(nq, dtype=jnp.int32) * bq)[None, None, :, None]
  ld = q0 - jnp.minimum(offs, s)[:, :, None, :] + bq                       # [B, H, nq, F]
  last = jnp.take_along_axis(ld, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  ld = jnp.clip(jnp.where(jnp.arange(f) < count[..., None], ld, last), 0, nq * bq).astype(jnp.int32)
  rows = bq + nq * bq                                                      # bq in front, up to nq * bq after
  pad = lambda x: jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (bq, rows - bq - s), (0, 0)))  # noqa: E731
  q = jnp.pad(jnp.transpose(q_BTHD, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, nq * bq - t), (0, 0)))
  k, v = pad(k_BSKD), pad(v_BSKD)                                          # [B, K, rows, D]
  row_block = lambda bi, hh, qi, j, *_: (bi, hh, qi, 0)                    # noqa: E731
  window = lambda bi, hh, qi, j, count_ref, ld_ref, *_: (bi, hh // g, ld_ref[bi, hh, qi, j], 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, bq, d), row_block),
              pl.BlockSpec((None, None, pl.Element(bq), d), window),
              pl.BlockSpec((None, None, pl.Element(bq), d), window)]
  args = [q, k, v]
  has_cols = exclude_columns is not None
  ccount = jnp.zeros((b, h, nq), jnp.int32)
  if has_cols:   # each key's first slot in the shared list (n: not listed), padded as K
    slot, n = column_slots(exclude_columns, s)
    args.append(jnp.pad(slot, ((0, 0), (0, 0), (bq, rows - bq - s)), constant_values=n)[..., None])
    in_specs.append(pl.BlockSpec((None, None, pl.Element(bq), 1),
                                 lambda bi, hh, qi, j, count_ref, ld_ref, *_: (bi, hh, ld_ref[bi, hh, qi, j], 0)))
    ccount = jnp.clip(exclude_columns.count, 0, n).astype(jnp.int32)
  out_specs = [pl.BlockSpec((None, None, bq, d), row_block), pl.BlockSpec((None, None, bq, 1), row_block)]
  out_shape = [jax.ShapeDtypeStruct((b, h, nq * bq, d), q.dtype), jax.ShapeDtypeStruct((b, h, nq * bq, 1), jnp.float32)]
  aliases = {}
  if poison is not None:  # testing hook: outputs start poisoned; an unwritten element keeps it
    aliases = {4 + len(args): 0, 4 + len(args) + 1: 1}
    args += [jnp.full(o.shape, poison, o.dtype) for o in out_shape]
    in_specs += out_specs
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(b, h, nq, f), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  kernel = functools.partial(_kernel, scale=scale, block_q=bq, steps=f, has_cols=has_cols, aliased=poison is not None)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="lcinfer_tpu_diagonal_fwd")(count, ld, offs.astype(jnp.int32), ccount, *args)
  return jnp.transpose(out[:, :, :t], (0, 2, 1, 3)), jnp.transpose(lse[:, :, :t, 0], (0, 2, 1))


def tpu_diagonal_attention(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, *, scale: float, exclude=None,
                           exclude_columns=None, merge_with=None, block_q: int = 64, interpret: bool = False,
                           _poison: float | None = None, **unused):
  """`diagonals.diagonal_attention`'s contract on a TPU (or in TPU interpret mode on CPU), module
  docstring; the GPU kernel's knobs are accepted and ignored. Returns (out [B, T, H, D] in q's
  dtype, lse [B, T, H] f32)."""
  del unused
  _check_args(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, block_q, merge_with)
  if not interpret and not _on_tpu():
    raise dispatch.Unsupported("the TPU diagonal kernel needs a TPU; pass interpret=True to run it in TPU "
                               "interpret mode on CPU")
  if exclude is not None:
    raise dispatch.Unsupported("the TPU diagonal kernel drops excluded columns, not excluded ranges")
  _check_blocks(block_q, block_q, interpret)
  out, lse = _tpu_diagonals(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude_columns, scale=float(scale),
                            block_q=block_q, interpret=bool(interpret), poison=_poison)
  return merged_with((out, lse), merge_with, q_BTHD.dtype)


dispatch.register("diagonal_attention", "tpu", tpu_diagonal_attention)
