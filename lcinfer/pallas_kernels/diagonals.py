"""Exact far slashes: vertical-slash attention whose isolated slashes are taken as diagonals.

MInference (Jiang et al. 2024, "MInference 1.0", Sec. 3: the vertical-slash pattern) attends, per query block
[q0, q1], a slash o's whole key range [q0 - o, q1 - o]: every row sees block_q keys of it where
one (key i - o) was selected. For the far slashes of its patterns (isolated diagonals) that is
block_q x block_q pairs for block_q useful ones, which caps the efficiency of any block kernel
(density x dense time / time: BENCHMARKS.md). The exact mode here keeps MInference's ranges for
the runs of slashes (the near band, where ranges are nearly exact) and takes each isolated slash
as a diagonal: query row i attends exactly key i - o, one logit and one rank-1 update per row
(no matrix unit), block_q K/V rows loaded per diagonal as a range step loads its window:

    rest, offsets_BHF = split_isolated_slashes(slash_idx, seq_len, min_gap=block_q, max_diagonals=64)
    ranges, cols = vertical_slash_to_ranges(vertical_idx, rest, ...)        # runs + verticals
    out, lse = diagonal_attention(offsets, exclude_columns=cols, merge_with=block_sparse(ranges, cols))

(`exact_vertical_slash_attention` does all three.) Key set: keys {k <= i : k a vertical, or i - k
an isolated slash} exactly, plus the runs' ranges; a subset of MInference's, a superset of the
exact pattern. `diagonal_attention` counts a key once: keys inside the excluded ranges or columns
of the row's block are left to the block-sparse call.

Kernel (`diagonals_kernel.py`; Pallas, Triton lowering; interpret mode on CPU): one program per
(query block, batch, query head), or `programs` persistent ones sharing those items; K/V refs span
the whole sequence of kv head h // G (GQA without repeats); a `fori_loop` over the head's
ascending offsets up to the block's last row: gather the block_q key rows i - o, logits by an
elementwise product and a row sum, online softmax (exp2) with one key a row; the block-sparse
call's (out, lse) merged in the epilogue. Defaults: block_q 64 (a power of
two: Triton tiles), isolation gap = block_q (an isolated slash's keys then lie outside every slash
range of any block), at most 64 diagonals a head, two diagonals a step, 8 warps (4 below 64 rows),
3 stages, query blocks launched first: the fastest of 19 knob sets on the H200 for the 50 far slashes
of (30, 800) at 128K, H = 32 (7.84 ms, 6.7 TB/s of K/V rows against 9.6 ms for 1 diagonal / 4 warps /
2 stages, 15.8 ms heads first: benchmarks/NOTES.md, session 20). On a TPU the dispatcher takes
`tpu_diagonals.py` (Mosaic TPU, block_q a multiple of 128: the exact mode's diagonal_block_q
defaults to 128 there); where no kernel can run, `diagonals_xla.py`: the same in plain XLA, a scan over the offsets
in memory linear in T (the oracle here builds [B, H, T, S] masks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels import online_softmax as osm
from lcinfer.pallas_kernels.diagonals_kernel import _kernel, _persistent_kernel
from lcinfer.pallas_kernels.flash_triton import SUPPORTED_HEAD_DIMS, _check_block, _gpu_backend, _next_pow2
from lcinfer.pallas_kernels.launch import hopper_device, triton_call
from lcinfer.pallas_kernels.reference import check_qkv, masked_attention_reference
from lcinfer.pallas_kernels.sparse_index import (Columns, _last_q_row, _sort_dedupe, check_vertical_slash_args,
                                                 count_at_most, shared_vertical_columns)
from lcinfer.pallas_kernels.tpu_block_sparse import _on_tpu
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, _clipped, check_ranges, ranges_key_mask


def _check_offsets(offsets_BHF, b: int, h: int) -> None:
  if offsets_BHF.ndim != 3 or offsets_BHF.shape[:2] != (b, h):
    raise ValueError(f"offsets must be [B, H, F] = [{b}, {h}, F] (one list of diagonal offsets per "
                     f"query head), got shape {tuple(offsets_BHF.shape)}")
  if not jnp.issubdtype(offsets_BHF.dtype, jnp.integer):
    raise ValueError(f"offsets must be integers, got {offsets_BHF.dtype}")


def canonical_offsets(offsets_BHF, s: int):
  """Ascending, duplicate-free offsets in [0, s) per head; other entries (outside, repeats) become
  2s and sort last. Returns [B, H, F] int32."""
  o = offsets_BHF.astype(jnp.int32)
  return _sort_dedupe(o, (o >= 0) & (o < s), 2 * s)[0]


def split_isolated_slashes(slash_idx, seq_len: int, min_gap: int, max_diagonals: int = 64):
  """Slash offsets [B, H, S] (entries outside [0, seq_len) ignored) split into (rest [B, H, S],
  offsets [B, H, max_diagonals]): a slash at least min_gap away from every other one is isolated;
  up to max_diagonals of them per head (the nearest the diagonal) become diagonal offsets
  (ascending, -1 padded) and are replaced by -1 in rest. The others stay slashes for the range
  builder. Jittable."""
  if not isinstance(min_gap, int) or min_gap < 1 or not isinstance(max_diagonals, int) or max_diagonals < 1:
    raise ValueError(f"min_gap and max_diagonals must be static ints >= 1, got {min_gap!r}, {max_diagonals!r}")
  if slash_idx.ndim != 3 or not jnp.issubdtype(slash_idx.dtype, jnp.integer):
    raise ValueError(f"slash_idx must be an integer [B, H, S] array, got {slash_idx.dtype} {tuple(slash_idx.shape)}")
  t = seq_len
  o = slash_idx.astype(jnp.int32)
  o = jnp.sort(jnp.where((o >= 0) & (o < t), o, 2 * t), axis=-1)      # ascending, invalid last
  ok = o < t
  far = jnp.full_like(o[..., :1], 4 * t)
  gap_before = o - jnp.concatenate([-far, o[..., :-1]], axis=-1)
  nxt = jnp.concatenate([o[..., 1:], far], axis=-1)
  gap_after = jnp.where(nxt < t, nxt - o, 4 * t)
  isolated = ok & (gap_before >= min_gap) & (gap_after >= min_gap)
  rank = jnp.cumsum(isolated, axis=-1) - 1
  taken = isolated & (rank < max_diagonals)
  b, h, n = o.shape
  slot = jnp.where(taken, rank, max_diagonals).reshape(-1, n)
  offs = jax.vmap(lambda sl, x: jnp.full((max_diagonals,), -1, jnp.int32).at[sl].set(x, mode="drop"))(
      slot, o.reshape(-1, n))
  rest = jnp.where(taken | ~ok, -1, o)
  return rest, offs.reshape(b, h, max_diagonals)


def diagonal_key_mask(offsets_BHF, t: int, s: int):
  """Boolean [B, H, T, S]: key i - o for every listed offset o in [0, s). Reference and tests."""
  o = offsets_BHF.astype(jnp.int32)
  b, h, _ = o.shape
  ok = (o >= 0) & (o < s)
  listed = jnp.zeros((b, h, s + 1), bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None],
                                              jnp.where(ok, o, s)].set(True)[..., :s]    # [B, H, S]
  d = jnp.arange(t)[:, None] - jnp.arange(s)[None, :]                                   # i - k
  return jnp.where(d >= 0, listed[:, :, jnp.clip(d, 0, s - 1)], False)


def _exclusion_mask(exclude, exclude_columns, t, s, block_q):
  if exclude is None and exclude_columns is None:
    return None
  if exclude is None:  # columns alone: an empty range list in their blocks
    b, h, nq = exclude_columns.count.shape
    zero = jnp.zeros((b, h, nq, 1), jnp.int32)
    exclude = KeyRanges(jnp.zeros((b, h, nq), jnp.int32), zero, zero, block_q, 1)
  return ranges_key_mask(exclude, exclude_columns, t, s, causal=True)


def column_slots(exclude_columns: Columns, s: int):
  """([B, H, S] int32, n): each key's first slot in the head's shared column list (index
  [B, H, 1, n]; entries outside [0, S) ignored), n where it is not listed. A key of a block is in
  the block's prefix iff its slot < the block's count, whatever the list's order."""
  idx = exclude_columns.index[:, :, 0, :].astype(jnp.int32)
  b, h, n = idx.shape
  bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  slot = jnp.full((b, h, s), n, jnp.int32).at[bi, hi, jnp.where((idx >= 0) & (idx < s), idx, s)].min(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), idx.shape), mode="drop")
  return slot, n


def _check_args(q, k, v, offsets_BHF, exclude, exclude_columns, block_q, merge_with=None):
  b, t, h, _, s, _ = check_qkv(q, k, v)
  if merge_with is not None:
    if not (isinstance(merge_with, tuple) and len(merge_with) == 2):
      raise ValueError("merge_with must be an (out [B, T, H, D], lse [B, T, H]) pair or None")
    if merge_with[0].shape != q.shape or merge_with[1].shape != (b, t, h):
      raise ValueError(f"merge_with must be out {tuple(q.shape)} and lse {(b, t, h)}, got "
                       f"{tuple(merge_with[0].shape)} and {tuple(merge_with[1].shape)}")
  if s != t:
    raise ValueError(f"diagonal attention is causal self-attention (key i - o): needs S == T, got T={t}, S={s}")
  _check_offsets(offsets_BHF, b, h)
  nq = -(-t // block_q)
  if exclude is not None:
    if not isinstance(exclude, KeyRanges):
      raise ValueError(f"exclude must be KeyRanges (vertical_slash.py) or None, got {type(exclude).__name__}")
    check_ranges(exclude, b, h, t)
    if exclude.block_q != block_q:
      raise ValueError(f"exclude.block_q ({exclude.block_q}) must equal block_q ({block_q}): the excluded "
                       "ranges are per query block")
  if exclude_columns is not None:
    if not isinstance(exclude_columns, Columns):
      raise ValueError(f"exclude_columns must be Columns or None, got {type(exclude_columns).__name__}")
    idx = exclude_columns.index
    if idx.ndim != 4 or idx.shape[:3] != (b, h, 1) or exclude_columns.count.shape != (b, h, nq):
      raise ValueError(f"exclude_columns must be one shared list per head: index [B, H, 1, n] and count "
                       f"[B, H, nq] = {(b, h, nq)}; got {tuple(idx.shape)} and {tuple(exclude_columns.count.shape)}")


def diagonal_reference(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, *, scale: float, exclude: KeyRanges | None = None,
                       exclude_columns: Columns | None = None, merge_with=None, block_q: int = 64,
                       diagonals_per_step: int = 2, heads_first: bool = False, interpret: bool = False,
                       num_warps=None, num_stages=None, programs=None, descending=None):
  """Float32 oracle of `diagonal_attention` from dense masks (merge_with through `merge_attention`).
  Returns (out [B,T,H,D], lse [B,T,H]); the kernel's knobs are accepted and ignored."""
  del diagonals_per_step, heads_first, interpret, num_warps, num_stages, programs, descending
  _check_args(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, block_q, merge_with)
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  mask = diagonal_key_mask(offsets_BHF, t, s)
  excl = _exclusion_mask(exclude, exclude_columns, t, s, block_q)
  if excl is not None:
    mask = mask & ~excl
  out = masked_attention_reference(q_BTHD, k_BSKD, v_BSKD, mask, scale=scale)
  return merged_with(out, merge_with)


def merged_with(out_lse, merge_with, dtype=jnp.float32):
  """(out, lse) merged with the other call's `merge_with` (merge_attention, float32) when given, out
  cast to dtype. The implementations that do not merge in their kernel's epilogue end with it."""
  out, lse = out_lse
  if merge_with is not None:
    from lcinfer.attention.base import merge_attention
    out, lse = merge_attention([(merge_with[0].astype(jnp.float32), merge_with[1]), (out.astype(jnp.float32), lse)])
  return out.astype(dtype), lse


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "per_step", "heads_first", "num_warps", "num_stages",
                                             "interpret", "poison", "programs", "descending"))
def _diagonal(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, merge_with, *, scale, block_q, per_step,
              num_warps, num_stages, interpret, poison, heads_first=False, programs=None, descending=False):
  b, t, h, d = q_BTHD.shape
  s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kh
  nq = pl.cdiv(t, block_q)
  tp = nq * block_q
  offs = canonical_offsets(offsets_BHF, s)                                # [B, H, F]
  f = _next_pow2(pl.cdiv(offs.shape[-1], per_step) * per_step)            # whole steps read 2S padding
  offs = jnp.pad(offs, ((0, 0), (0, 0), (0, f - offs.shape[-1])), constant_values=2 * s)
  count = count_at_most(offs, _last_q_row(nq, block_q, t))                # offsets a block can use
  ccount = (jnp.zeros_like(count) if exclude_columns is None
            else jnp.clip(exclude_columns.count, 0, exclude_columns.index.shape[-1]).astype(jnp.int32))
  meta = jnp.stack([count, ccount], axis=-1).astype(jnp.int32)            # [B, H, nq, 2]
  q = jnp.pad(q_BTHD, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  # grid (query block, batch, head), or (head, query block, batch) with heads_first: the programs in
  # flight then read the same key positions of every head (one 8 KB run at 32 heads x 256 B)
  grid, qb_axis, ibh = ((h, nq, b), 1, lambda x, y, z: (y, z, x)) if heads_first else \
      ((nq, b, h), 0, lambda x, y, z: (x, y, z))
  spec = lambda shape, f: pl.BlockSpec(shape, lambda *ids: f(*ibh(*ids)))   # noqa: E731 (f of (i, bi, hi))
  q_spec = spec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = spec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
  per_head = lambda n: spec((None, None, n), lambda i, bi, hi: (bi, hi, 0))   # noqa: E731
  per_block = lambda n: spec((None, None, None, n), lambda i, bi, hi: (bi, hi, i, 0))  # noqa: E731
  args = [q, k_BSKD, v_BSKD, meta, offs]
  in_specs = [q_spec, kv_spec, kv_spec, per_block(2), per_head(offs.shape[-1])]
  if exclude is not None:
    lo, hi, listed = _clipped(exclude, s)
    mb = _next_pow2(lo.shape[-1])                                         # Triton loads them whole
    lo, hi, listed = (jnp.pad(x, ((0, 0),) * 3 + ((0, mb - x.shape[-1]),)) for x in (lo, hi, listed))
    args += [jnp.where(listed, lo, 0).astype(jnp.int32), jnp.where(listed, hi, 0).astype(jnp.int32)]
    in_specs += [per_block(mb), per_block(mb)]
  if exclude_columns is not None:   # the slot of each key in the shared list (n: none), first repeat
    args.append(column_slots(exclude_columns, s)[0])
    in_specs.append(per_head(s))
  lse_spec = spec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
  if merge_with is not None:
    mo, mlse = merge_with
    args += [jnp.pad(mo, ((0, 0), (0, tp - t), (0, 0), (0, 0))),
             jnp.pad(jnp.transpose(mlse.astype(jnp.float32), (0, 2, 1)), ((0, 0), (0, 0), (0, tp - t)),
                     constant_values=-jnp.inf)]
    in_specs += [q_spec, lse_spec]
  out_shape = [jax.ShapeDtypeStruct((b, tp, h, d), q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  flags = dict(has_ranges=exclude is not None, has_cols=exclude_columns is not None,
               has_merge=merge_with is not None, aliased=poison is not None)
  common = dict(qk_scale=scale * osm.LOG2E, block_q=block_q, s_valid=s, per_step=per_step, descending=descending,
                **flags)
  out_specs = [q_spec, lse_spec]
  if programs is None:
    kernel = functools.partial(_kernel, qb_axis=qb_axis, **common)
  else:   # every ref whole; each program walks its share of the (query block, batch, head) items
    whole = lambda x: pl.BlockSpec(x.shape, lambda p: (0,) * len(x.shape))   # noqa: E731
    grid, in_specs, out_specs = (programs,), [whole(x) for x in args], [whole(x) for x in out_shape]
    kernel = functools.partial(_persistent_kernel, programs=programs, n_items=nq * b * h, heads=h, batch=b, group=g,
                               **common)
  out, lse = triton_call(kernel, args, grid=grid, in_specs=in_specs, out_specs=out_specs,
                         out_shape=out_shape, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                         name="lcinfer_diagonal_fwd", poison=poison)
  return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))


def diagonal_attention(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, *, scale: float, exclude: KeyRanges | None = None,
                       exclude_columns: Columns | None = None, merge_with=None, block_q: int = 64,
                       diagonals_per_step: int = 2, heads_first: bool = False, programs: int | None = None,
                       descending: bool = False, interpret: bool = False, num_warps: int | None = None,
                       num_stages: int | None = None, _poison: float | None = None):
  """Attention of query row i over the keys i - o, o in offsets_BHF[b, h] ([B, H, F] ints; entries
  outside [0, S) and repeats ignored), minus the keys of its query block (block_q rows) in
  `exclude` (KeyRanges of the same block_q) or in `exclude_columns` (one shared list per head, each
  block taking its count's prefix): those are counted by the block-sparse call this one is merged
  with. Causal self-attention (S == T). Returns (out [B, T, H, D] in q's dtype, lse [B, T, H] f32);
  a row with no key: out 0, lse -inf. Raises ValueError for malformed calls, `dispatch.Unsupported`
  for head_dim outside (64, 128) or no GPU without interpret. merge_with: that call's (out, lse),
  merged into the result in the kernel's epilogue (`merge_attention`'s formula; no pass over both
  outputs after it). Knobs for the GPU (the result is the same): diagonals_per_step, how many
  diagonals share one rescale of the accumulator; heads_first, the launch order of the programs;
  programs=P, a persistent launch of P programs that share the (query block, batch, head) items
  (a few CTAs that leave the other SMs to another kernel; 3-13x slower than the grid on the H200),
  items in the grid's default order (so not with heads_first); descending, each block
  walks its offsets from the largest (the blocks in flight, started at different times, then read
  nearer key rows at once, so more of a head's K/V reads hit L2: 3-5% faster on (30, 800)'s far
  slashes alone on the H200, not measurably inside the exact mode; `l2-nvidia-h200.md`)."""
  _check_block("block_q", block_q)
  if not isinstance(diagonals_per_step, int) or not 1 <= diagonals_per_step <= 8:
    raise ValueError(f"diagonals_per_step must be an int in [1, 8], got {diagonals_per_step!r}")
  if programs is not None and (not isinstance(programs, int) or programs < 1):
    raise ValueError(f"programs must be None or an int >= 1 (a persistent launch), got {programs!r}")
  if programs is not None and heads_first:
    raise ValueError("heads_first orders the grid's programs; a persistent launch (programs=...) has its own "
                     "order: pass one of them")
  _check_args(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, block_q, merge_with)
  d = q_BTHD.shape[-1]
  if d not in SUPPORTED_HEAD_DIMS:
    raise dispatch.Unsupported(f"head_dim {d} is not supported by the Triton diagonal kernel "
                               f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  if not interpret and _gpu_backend() is None:
    raise dispatch.Unsupported("the Triton diagonal kernel needs a CUDA GPU; pass interpret=True to run it on CPU")
  return _diagonal(q_BTHD, k_BSKD, v_BSKD, offsets_BHF, exclude, exclude_columns, merge_with, scale=float(scale),
                   block_q=block_q, per_step=diagonals_per_step, heads_first=bool(heads_first),
                   num_warps=num_warps or (8 if block_q >= 64 else 4), num_stages=num_stages or 3,
                   interpret=bool(interpret), poison=_poison, programs=programs, descending=bool(descending))


dispatch.register("diagonal_attention", "triton", diagonal_attention)   # "xla": diagonals_xla.py


def exact_vertical_slash_attention(q_BTHD, k_BSKD, v_BSKD, vertical_idx, slash_idx, *, scale: float,
                                   block_q: int | None = None, block_k: int | None = None, max_ranges: int,
                                   max_cols: int, max_diagonals: int = 64, diagonal_block_q: int | None = None,
                                   diagonals_per_step: int = 2, diagonal_descending: bool = False,
                                   diagonal_programs: int | None = None, implementation=None, interpret: bool = False):
  """Vertical-slash attention with the isolated slashes exact (module docstring): the runs of
  slashes (ranges of block_q x block_k, as the kernel named by `implementation` takes them) and the
  verticals through the block-sparse dispatcher, the isolated slashes (>= block_q from every other)
  through `diagonal_attention` (its own diagonal_block_q rows a program, default 64, 128 on a TPU;
  "triton", "tpu", else "xla"), which merges the block-sparse result into its own by lse. Returns
  (out [B, T, H, D], lse [B, T, H]).

  Blocks default to 128 x 64 where the Hopper kernel runs (a Hopper GPU, `implementation` None or
  starting with "mosaic_gpu", not interpret mode: the fastest layout of the H200 benchmark,
  `benchmarks/results/kernels-nvidia-h200-vs-exact.md`), else 64 x 64. diagonal_programs=P: the
  diagonal kernel as P persistent programs (`diagonal_attention`'s programs; 3-13x slower on the
  H200, `benchmarks/results/l2-nvidia-h200.md`). diagonal_descending: `diagonal_attention`'s
  descending. The same result either way."""
  from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges
  if (block_q is None) != (block_k is None):
    raise ValueError(f"pass both block_q and block_k or neither, got {block_q!r} x {block_k!r}")
  if block_q is None:
    block_q, block_k = (128, 64) if _hopper_serves(implementation, interpret) else (64, 64)
  if diagonal_block_q is None:   # the TPU kernel's rows come in tiles of 128
    diagonal_block_q = 128 if _on_tpu() else 64
  check_vertical_slash_args(vertical_idx, slash_idx, block_q=block_q, block_k=block_k, max_ranges=max_ranges,
                            max_cols=max_cols, max_diagonals=max_diagonals, diagonal_block_q=diagonal_block_q)
  b, t, h = q_BTHD.shape[:3]
  if vertical_idx.shape[:2] != (b, h):
    raise ValueError(f"vertical_idx and slash_idx must be [B, H, n] with q's B, H = {(b, h)}, got "
                     f"{tuple(vertical_idx.shape)} and {tuple(slash_idx.shape)}")
  rest, offsets = split_isolated_slashes(slash_idx, t, block_q, max_diagonals)
  ranges, cols = vertical_slash_to_ranges(vertical_idx, rest, t, block_q, block_k, max_ranges, max_cols)
  # No diagonal key lies in a slash range of its block: rows [q0, q1] of a block have q1 - q0 <
  # block_q, so o >= o' + block_q gives i - o < q0 - o' and o <= o' - block_q gives i - o > q1 - o'.
  # The columns: the list is ascending and a block takes its entries <= its last row, so a key
  # i - o <= i is counted there iff it is in the list at all: every block excludes the whole list.
  # The same list as the builder's, from the verticals alone: the diagonal call then waits for the
  # slash split and one sort, not for the range builder.
  whole = shared_vertical_columns(vertical_idx, t, jnp.full((1, 1), t - 1, jnp.int32), max_cols)
  count, index = jnp.broadcast_to(whole.count, (b, h, -(-t // diagonal_block_q))), whole.index

  other = dispatch.call("block_sparse_attention", implementation, q_BTHD, k_BSKD, v_BSKD, ranges, scale=scale,
                        causal=True, columns=cols, interpret=interpret)
  return dispatch.call("diagonal_attention", None, q_BTHD, k_BSKD, v_BSKD, offsets, scale=scale,
                       exclude_columns=Columns(count, index, True), merge_with=other, block_q=diagonal_block_q,
                       diagonals_per_step=diagonals_per_step, programs=diagonal_programs,
                       descending=diagonal_descending, interpret=interpret)


def _hopper_serves(implementation, interpret: bool) -> bool:
  """Would the block-sparse dispatcher try the Hopper kernel first for this call?"""
  order = dispatch.call_order("block_sparse_attention", implementation)
  return not interpret and order[:1] == ("mosaic_gpu",) and hopper_device() is not None
