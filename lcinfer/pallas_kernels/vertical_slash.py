"""Key ranges at arbitrary offsets, and MInference's vertical-slash index built on device as ranges
plus gathered columns (Jiang et al. 2024, "MInference 1.0", Sec. 3.2 / Algorithm 3: slash lines
become key ranges of one query block's height starting at unaligned offsets, vertical lines become
gathered columns).

    ranges = KeyRanges(count [B, H, nq] int32, start [B, H, nq, M] int32, end [B, H, nq, M] int32,
                       block_q, block_k)                         # block_q / block_k static
    ranges, columns = vertical_slash_to_ranges(vertical_idx, slash_idx, seq_len, block_q, block_k,
                                               max_ranges, max_cols)

Semantics (shared by `ranges_key_mask` and the kernel in `block_sparse.py`): query row i (query
block qb = i // block_q) attends the UNION of the keys [start_j, min(end_j, start_j + block_k)) for
j < count[b, h, qb] (a range is at most block_k keys: one kernel load), and of the `Columns`,
intersected with (causal: key <= i) and [0, S). Overlapping or repeated ranges count each key once;
entries beyond `count` are ignored. `canonicalize_ranges` makes the kernel's form (clipped,
disjoint, sorted, the ranges that need no mask first) on device.

Compared with grid-aligned blocks (`sparse_index.vertical_slash_to_layout`) a slash far from the
diagonal costs one range per query block instead of up to two blocks, and adjacent slashes merge
into runs cut into block_k-long pieces, so the kernel loads ~(density x S) keys per query block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcinfer.pallas_kernels.sparse_index import (Columns, _check_int, _last_q_row, canonical_columns,
                                                 merge_into_pieces, shared_vertical_columns,
                                                 sorted_slash_offsets, check_vertical_slash_args,
                                                 stable_partition, count_at_most)


PIECE_ALIGN = 8  # pieces of a run are cut at multiples of 8 keys: TMA loads of tiled (8-row) tiles


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyRanges:
  """Per (batch, head, query block): how many key ranges, and their [start, end) (padded lists)."""
  count: jax.Array   # [B, H, nq] int32
  start: jax.Array   # [B, H, nq, max_ranges] int32
  end: jax.Array     # [B, H, nq, max_ranges] int32
  block_q: int = dataclasses.field(metadata=dict(static=True), default=64)
  block_k: int = dataclasses.field(metadata=dict(static=True), default=64)
  # True promises that every list is already the kernels' form: ascending, disjoint, non-empty
  # ranges in [0, S), none starting above the block's last row, each inside one PIECE_ALIGN-aligned
  # window of block_k keys. The builder sets it (its pieces are made so); the kernels' input
  # preparation then takes the lists as they are instead of sorting them. False for anything else.
  canonical: bool = dataclasses.field(metadata=dict(static=True), default=False)

  @property
  def max_ranges(self) -> int:
    return self.start.shape[-1]

  def saturated(self) -> jax.Array:
    """[B, H, nq] bool: query blocks whose list is full. `vertical_slash_to_ranges` keeps the ranges
    nearest the diagonal when more are found than fit, so a saturated block may miss slash keys:
    check `jnp.any(ranges.saturated())` and rebuild with a larger max_ranges."""
    return self.count >= self.max_ranges


def check_ranges(ranges: KeyRanges, b: int, h: int, t: int) -> None:
  """Trace-time validation of KeyRanges against queries [B, T, H, ...]. ValueError."""
  for name in ("block_q", "block_k"):
    v = getattr(ranges, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"ranges.{name} must be a positive static int, got {v!r}")
  if not isinstance(ranges.canonical, bool):
    raise ValueError(f"ranges.canonical must be a static bool, got {ranges.canonical!r}")
  nq = -(-t // ranges.block_q)
  _check_int("ranges.count", ranges.count, (b, h, nq))
  if ranges.start.ndim != 4:
    raise ValueError(f"ranges.start must be [B, H, nq, max_ranges], got shape {tuple(ranges.start.shape)}")
  _check_int("ranges.start", ranges.start, (b, h, nq, ranges.start.shape[-1]))
  _check_int("ranges.end", ranges.end, tuple(ranges.start.shape))


def _clipped(ranges: KeyRanges, s: int):
  """(lo, hi, listed): ranges clipped to [0, s) and to block_k keys; `listed` = j < count."""
  lo = ranges.start.astype(jnp.int32)
  hi = jnp.minimum(ranges.end.astype(jnp.int32), lo + ranges.block_k)
  lo, hi = jnp.clip(lo, 0, s), jnp.clip(hi, 0, s)
  listed = jnp.arange(lo.shape[-1]) < ranges.count[..., None]
  return lo, hi, listed


def ranges_key_mask(ranges: KeyRanges, columns: Columns | None, t: int, s: int, causal: bool = True):
  """Boolean [B, H, T, S]: the key set of `ranges` (+ columns). Reference and tests only."""
  lo, hi, listed = _clipped(ranges, s)
  keys = jnp.arange(s)
  per_block = jnp.any(listed[..., None] & (lo[..., None] <= keys) & (keys < hi[..., None]), axis=-2)
  if columns is not None:
    okc = jnp.arange(columns.index.shape[-1]) < columns.count[..., None]
    per_block = per_block | jnp.any((columns.index[..., None] == keys) & okc[..., None], axis=-2)
  mask = per_block[:, :, jnp.arange(t) // ranges.block_q]            # [B, H, T, S]
  if causal:
    mask = mask & (keys[None, :] <= jnp.arange(t)[:, None])
  return mask


def ascending_ranges(ranges: KeyRanges, columns: Columns | None, t: int, s: int, causal: bool,
                     align: int = 1):
  """The kernels' form, same key set, in ascending order: (lo, hi [B, H, nq, M'], count, whole
  [B, H, nq, M'] bool, columns) with ranges clipped, sorted, disjoint (each minus what earlier ones
  cover), empty ones dropped (entries past count are 0); `whole` marks the ranges every row of the
  query block sees whole (block_k keys at or before its first row); columns as
  `sparse_index.canonical_columns` (the kernel masks those inside a range). align > 1: each range
  is first split at the end of its `align`-aligned window of block_k keys [lo - lo % align,
  + block_k), so that every range lies in one such window (M' = 2M; the builders' pieces already
  do, so the second halves are empty). Cost: two sorts of each list, none when `ranges.canonical`
  (and align divides PIECE_ALIGN): such lists are taken as they are (M' = M)."""
  bq, bk = ranges.block_q, ranges.block_k
  nq = ranges.count.shape[-1]
  last = _last_q_row(nq, bq, t)[:, None]
  first = (jnp.arange(nq, dtype=jnp.int32) * bq)[:, None]
  if ranges.canonical and PIECE_ALIGN % align == 0:
    lo, hi = ranges.start.astype(jnp.int32), ranges.end.astype(jnp.int32)
    count = jnp.clip(ranges.count, 0, lo.shape[-1]).astype(jnp.int32)
  else:
    lo, hi, ok = _clipped(ranges, s)
    if align > 1:
      cut = jnp.minimum(lo - lo % align + bk, hi)
      lo, hi, ok = (jnp.concatenate(x, axis=-1) for x in ((lo, cut), (cut, hi), (ok, ok)))
    ok = ok & (lo < hi)
    if causal:
      ok = ok & (lo <= last)
    lo, hi = lax.sort((jnp.where(ok, lo, s), jnp.where(ok, hi, s)), dimension=lo.ndim - 1, num_keys=1)
    prev = lax.cummax(hi, axis=hi.ndim - 1)
    prev = jnp.concatenate([jnp.zeros_like(prev[..., :1]), prev[..., :-1]], axis=-1)
    lo = jnp.maximum(lo, prev)                                   # minus what earlier ranges cover
    ok = lo < hi
    count = jnp.sum(ok, axis=-1).astype(jnp.int32)
    lo, hi = lax.sort((jnp.where(ok, lo, s), jnp.where(ok, hi, s)), dimension=lo.ndim - 1, num_keys=1)
  new_cols = None if columns is None else canonical_columns(columns, last, s, causal)
  valid = jnp.arange(lo.shape[-1]) < count[..., None]
  lo, hi = jnp.where(valid, lo, 0), jnp.where(valid, hi, 0)
  whole = valid & (hi - lo == bk)
  if causal:
    whole = whole & (hi - 1 <= first)
  return lo, hi, count, whole, new_cols


def canonicalize_ranges(ranges: KeyRanges, columns: Columns | None, t: int, s: int, causal: bool,
                        align: int = 1):
  """`ascending_ranges`, reordered so that the n_whole ranges every row of the query block sees
  whole come first (each part still ascending): (lo, hi, count, n_whole, columns)."""
  lo, hi, count, whole, new_cols = ascending_ranges(ranges, columns, t, s, causal, align)
  valid = jnp.arange(lo.shape[-1]) < count[..., None]
  lo, hi = stable_partition(jnp.where(whole, 0, jnp.where(valid, 1, 2)), lo, hi)
  return lo, hi, count, jnp.sum(whole, axis=-1).astype(jnp.int32), new_cols


def _offset_runs(o_desc, gap: int, n_runs: int, invalid: int):
  """Slash offsets (descending per row, `invalid` entries first) grouped into runs of consecutive
  offsets at most `gap` apart: for a full query block of height `gap` their key ranges overlap or
  touch, whatever the block. Returns the `n_runs` runs nearest the diagonal (smallest offsets), in
  descending order, as (o_hi, o_lo, has) [B, H, n_runs]; `has` is False for unused slots."""
  b, h, n = o_desc.shape
  ok = o_desc < invalid
  prev = jnp.concatenate([jnp.full_like(o_desc[..., :1], invalid), o_desc[..., :-1]], axis=-1)
  prev_ok = jnp.concatenate([jnp.zeros_like(ok[..., :1]), ok[..., :-1]], axis=-1)
  new = ok & (~prev_ok | (prev - o_desc > gap))
  total = jnp.sum(new, axis=-1, keepdims=True)
  slot = jnp.cumsum(new, axis=-1) - 1 - (total - n_runs)             # the last n_runs runs: 0..n_runs-1
  slot = jnp.where(ok & (slot >= 0), slot, n_runs)                   # others: dropped

  def one(sl, od):
    hi = jnp.full((n_runs,), -1, jnp.int32).at[sl].max(od, mode="drop")
    lo = jnp.full((n_runs,), invalid, jnp.int32).at[sl].min(od, mode="drop")
    return hi, lo
  o_hi, o_lo = jax.vmap(one)(slot.reshape(-1, n), o_desc.reshape(-1, n))
  o_hi, o_lo = o_hi.reshape(b, h, n_runs), o_lo.reshape(b, h, n_runs)
  return o_hi, o_lo, o_hi >= 0


@functools.partial(jax.jit, static_argnames=("seq_len", "block_q", "block_k", "max_ranges", "max_cols"))
def vertical_slash_to_ranges(vertical_idx, slash_idx, seq_len: int, block_q: int, block_k: int,
                             max_ranges: int, max_cols: int):
  """MInference's vertical-slash index as KeyRanges + Columns, built on device (jittable).

  vertical_idx [B, H, V] int: key columns every query (at or after them) attends.
  slash_idx [B, H, S] int: diagonal offsets o >= 0; query i attends key i - o.
  Entries outside [0, seq_len) are ignored (-1 pads). Causal self-attention, T = seq_len.

  For query block [q0, q1] a slash o covers keys [max(q0 - o, 0), q1 - o] (nothing if q1 < o).
  Sorted by start, these ranges merge into disjoint runs (overlapping or adjacent ones join), and
  each run is cut into block_k-long ranges. For full blocks two slashes' ranges join exactly when
  their offsets differ by at most block_q, whatever the block, so the runs are found once per head
  in offset space and each block only shifts and clips them: per-block work is O(max_ranges), not
  O(number of slashes). Runs are cut at multiples of PIECE_ALIGN (8): every piece lies in one
  8-aligned window of block_k keys, which the Hopper kernel loads whole. The last block, if
  shorter, gets its own merge. If there are more than `max_ranges`, the ones nearest the diagonal
  are kept (`KeyRanges.saturated` tells which blocks may have lost some: a far slash can take up
  to ceil((block_q + 7) / block_k) ranges per block). The verticals become the gathered
  columns: one ascending, duplicate-free list per head (Columns.index [B, H, 1, n],
  n <= max_cols, the highest dropped beyond it), of which each query block takes the prefix up to
  its last row (the kernel skips the ones inside the block's ranges; no per-block column arrays
  are built). Every required key {k <= q : k a
  vertical or q - k a slash} is attended (unless truncated), plus the other keys of the runs (a
  slash run spans the query block's height). Returns (KeyRanges, Columns). Jitted (the sizes are
  static): an eager call compiles once instead of running its few hundred ops one by one (~5 s on CPU).
  """
  check_vertical_slash_args(vertical_idx, slash_idx, seq_len=seq_len, block_q=block_q, block_k=block_k,
                            max_ranges=max_ranges, max_cols=max_cols)
  t, bk = seq_len, block_k
  nq = -(-t // block_q)
  q0 = (jnp.arange(nq, dtype=jnp.int32) * block_q)[:, None]
  q1 = _last_q_row(nq, block_q, t)[:, None]
  # -- slashes -> runs -> block_k pieces ----------------------------------------------------------
  o = sorted_slash_offsets(slash_idx, t)                              # descending; invalid (2t) first
  nfull = t // block_q
  parts = []
  if nfull:  # full blocks: runs found once per head, shifted per block
    o_hi, o_lo, has = _offset_runs(o, block_q, min(max_ranges, o.shape[-1]), invalid=2 * t)
    asc = jnp.flip(o, axis=-1)                                           # ascending, invalid last
    last = q1[:nfull, 0]
    at = jnp.maximum(count_at_most(asc, last) - 1, 0)
    m = jnp.take_along_axis(asc, at, axis=-1)                          # largest offset <= q1 (or more)
    hi_off = jnp.clip(m[..., None], o_lo[:, :, None, :], o_hi[:, :, None, :])
    valid = has[:, :, None, :] & (o_lo[:, :, None, :] <= last[:, None])
    lo = jnp.maximum(q0[:nfull] - hi_off, 0)
    hi = q1[:nfull] - o_lo[:, :, None, :]
    # runs more than block_q apart in offset leave a key between their ranges: no merge needed
    parts.append(merge_into_pieces(lo, hi, valid, bk, max_ranges, PIECE_ALIGN, disjoint=True))
  if nfull < nq:  # the last, shorter block: its own merge over the raw slashes
    oq = o[:, :, None, :]
    parts.append(merge_into_pieces(jnp.maximum(q0[nfull:] - oq, 0), q1[nfull:] - oq, oq <= q1[nfull:], bk,
                                   max_ranges, PIECE_ALIGN))
  count, start, stop = (jnp.concatenate(x, axis=2) for x in zip(*parts))
  ranges = KeyRanges(count, start, stop, block_q, block_k, canonical=True)   # merge_into_pieces' pieces
  return ranges, shared_vertical_columns(vertical_idx, t, q1, max_cols)

