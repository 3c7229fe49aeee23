"""Sparse attention structure as data, and its on-device (pure jnp, jittable) construction.

    layout = BlockSparse(count [B, H, nq] int32, kv_block_idx [B, H, nq, max_blocks] int32,
                         block_q, block_k)                       # block_q/block_k static
    columns = Columns(count [B, H, nq] int32, index [B, H, nq, max_cols] int32)

Semantics (shared by `reference.block_sparse_reference` and the kernel in `block_sparse.py`):
query row i (query block qb = i // block_q) attends the UNION of
  * every key in KV block kv_block_idx[b, h, qb, j] for j < count[b, h, qb]
    (keys idx * block_k .. idx * block_k + block_k - 1), and
  * every key column index[b, h, qb, j] for j < columns.count[b, h, qb],
intersected with (causal: key <= i) and (key < S). Keys are counted once however often they are
listed (duplicate blocks, duplicate columns, a column inside a listed block). Entries at or beyond
`count` are ignored whatever they hold; listed entries outside the sequence (block index < 0 or
>= cdiv(S, block_k); column < 0 or >= S) are ignored too (masked, never clamped onto a real key).
These are run-time values, so they cannot be rejected at trace time; shapes and dtypes are.
A query that attends nothing gets out = 0 and lse = -inf.

`canonicalize` turns any layout into the form the kernel consumes (sorted, duplicate-free,
in-range block lists, causally clipped; columns disjoint from the listed blocks); it runs on
device before the kernel. Dense [T, T] masks never appear here (only in the float32 reference).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """Per (batch, head, query block): how many KV blocks, and which (padded list)."""
  count: jax.Array         # [B, H, nq] int32
  kv_block_idx: jax.Array  # [B, H, nq, max_blocks] int32
  block_q: int = dataclasses.field(metadata=dict(static=True), default=64)
  block_k: int = dataclasses.field(metadata=dict(static=True), default=64)

  @property
  def max_blocks(self) -> int:
    return self.kv_block_idx.shape[-1]

  def saturated(self) -> jax.Array:
    """[B, H, nq] bool: query blocks whose list is full. A builder that finds more blocks than fit
    keeps those nearest the diagonal and drops the rest, so a saturated block may miss keys:
    check `jnp.any(layout.saturated())` and rebuild with a larger max_blocks."""
    return self.count >= self.max_blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Columns:
  """Per (batch, head, query block): gathered key columns (the vertical part of vertical-slash).
  index [B, H, 1, n] is one list per head shared by the query blocks: block qb takes its first
  count[b, h, qb] entries. ascending=True (static) promises, for a shared list, that the entries
  every block may take (j < max count) are ascending, distinct and in [0, S): a block's columns
  are then all of the list up to its last one, which the Hopper kernel relies on (the builders
  set it; like `indices_are_sorted` in gathers, a false promise gives wrong results)."""
  count: jax.Array  # [B, H, nq] int32
  index: jax.Array  # [B, H, nq, max_cols] (or [B, H, 1, max_cols]) int32
  ascending: bool = dataclasses.field(metadata=dict(static=True), default=False)

  @property
  def max_cols(self) -> int:
    return self.index.shape[-1]


def _check_int(name, x, shape):
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array (int32), got dtype {x.dtype}")
  if shape is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_layout(layout: BlockSparse, columns: Columns | None, b: int, h: int, t: int):
  """Trace-time validation of a layout against queries [B, T, H, ...]. Raises ValueError."""
  if not isinstance(layout, BlockSparse):
    raise ValueError(f"layout must be a BlockSparse, got {type(layout).__name__}")
  for name in ("block_q", "block_k"):
    v = getattr(layout, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"layout.{name} must be a positive static int, got {v!r}")
  nq = -(-t // layout.block_q)
  _check_int("layout.count", layout.count, (b, h, nq))
  if layout.kv_block_idx.ndim != 4:
    raise ValueError(f"layout.kv_block_idx must be [B, H, nq, max_blocks], got shape "
                     f"{tuple(layout.kv_block_idx.shape)}")
  _check_int("layout.kv_block_idx", layout.kv_block_idx, (b, h, nq, layout.kv_block_idx.shape[-1]))
  if columns is not None:
    if isinstance(columns, tuple) or not isinstance(columns, Columns):
      raise ValueError(f"columns must be a Columns(count, index) or None, got {type(columns).__name__}")
    _check_int("columns.count", columns.count, (b, h, nq))
    if columns.index.ndim != 4:
      raise ValueError(f"columns.index must be [B, H, nq or 1, max_cols], got shape {tuple(columns.index.shape)}")
    rows = columns.index.shape[2] if columns.index.shape[2] == 1 else nq
    _check_int("columns.index", columns.index, (b, h, rows, columns.index.shape[-1]))


def _last_q_row(nq, block_q, t):
  """[nq] int32: the last (valid) query row of each query block."""
  return jnp.minimum((jnp.arange(nq, dtype=jnp.int32) + 1) * block_q, t) - 1


def count_at_most(sorted_rows, x):
  """[..., len(x)]: per row of sorted_rows [..., n] (ascending), how many entries are <= each x [m].
  A binary search unrolled into log2(n) gathers: jnp.searchsorted's default is an XLA while loop,
  whose condition the host reads back every iteration (H200, 128K vertical-slash index: 0.6-1.2 ms
  of idle GPU a call, and the host cannot run ahead of the GPU)."""
  flat = sorted_rows.reshape(-1, sorted_rows.shape[-1])
  found = jax.vmap(lambda row: jnp.searchsorted(row, x, side="right", method="scan_unrolled"))(flat)
  return found.reshape(sorted_rows.shape[:-1] + x.shape)


def _sort_dedupe(x, valid, sentinel):
  """Sort each row (last axis) of x ascending with invalid entries and duplicates pushed to the
  end as `sentinel`; returns (sorted x, count of distinct valid entries)."""
  x = jnp.sort(jnp.where(valid, x, sentinel), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(x[..., :1], bool), x[..., 1:] == x[..., :-1]], axis=-1)
  x = jnp.sort(jnp.where(dup, sentinel, x), axis=-1)
  return x, jnp.sum(x != sentinel, axis=-1).astype(jnp.int32)


def canonicalize(layout: BlockSparse, columns: Columns | None, t: int, s: int, causal: bool):
  """The kernel's input form, same key sets: block lists sorted ascending, duplicate-free, in
  range [0, cdiv(s, block_k)), without blocks wholly above the diagonal when causal (all entries
  < count are real; entries beyond are 0); columns sorted, duplicate-free, in [0, s), not inside
  a listed block, not above the block's last query row when causal (entries beyond count are 0).
  Cost: two sorts of each list; no [T, S] or [nq, nk] arrays."""
  bq, bk = layout.block_q, layout.block_k
  nq, nk = layout.count.shape[-1], -(-s // bk)
  last = _last_q_row(nq, bq, t)[:, None]                       # [nq, 1]
  idx = layout.kv_block_idx.astype(jnp.int32)
  j = jnp.arange(idx.shape[-1], dtype=jnp.int32)
  ok = (j < layout.count[..., None]) & (idx >= 0) & (idx < nk)
  if causal:
    ok = ok & (idx * bk <= last)
  blocks, count = _sort_dedupe(idx, ok, nk)
  new_layout = BlockSparse(count, jnp.where(blocks == nk, 0, blocks), bq, bk)
  if columns is None:
    return new_layout, None
  return new_layout, canonical_columns(columns, last, s, causal)


def stable_partition(cls, *xs, n_classes: int = 4):
  """xs [..., M] reordered along the last axis by class cls [..., M] (ints in [0, n_classes), order
  kept within a class), by counting, not sorting: an entry's slot is the number of entries of
  lower classes plus its rank in its own class, and each x is scattered there. The per-class counts
  are fields of bit_length(M) bits packed into uint32 words (4 classes of lists up to 255 long in
  one word), so one prefix sum over M gives every class's rank, and one scatter with unique
  indices places all xs. H200, 128K vertical-slash lists (75K rows of 147, two xs): ~0.17 ms for
  the scatter, against ~0.39 ms for the int32 key sort it replaces. Returns the reordered xs."""
  m = cls.shape[-1]
  w = max(m.bit_length(), 1)
  per_word = 32 // w
  if per_word == 0:
    raise ValueError(f"stable_partition: lists of {m} entries do not fit 32-bit counters")
  field = lambda x, c: (jnp.right_shift(x, jnp.uint32(c * w))                # noqa: E731 (counter c of x)
                        & jnp.uint32((1 << w) - 1)).astype(jnp.int32)
  cls = cls.astype(jnp.int32)
  rank = jnp.zeros(cls.shape, jnp.int32)
  base = jnp.zeros(cls.shape, jnp.int32)
  for first in range(0, n_classes, per_word):           # the classes [first, first + per_word)
    mine = (cls >= first) & (cls < first + per_word)
    shift = (jnp.where(mine, cls - first, 0) * w).astype(jnp.uint32)
    one = jnp.where(mine, jnp.left_shift(jnp.uint32(1), shift), jnp.uint32(0))
    incl = jnp.cumsum(one, axis=-1, dtype=jnp.uint32)
    total = incl[..., -1:]
    rank = jnp.where(mine, field(jnp.right_shift(incl - one, shift), 0), rank)
    for c in range(first, min(first + per_word, n_classes)):   # entries of lower classes
      base = base + jnp.where(cls > c, field(total, c - first), 0)
  dest = base + rank                                    # [..., M], a permutation of 0..M-1
  # one scatter of all xs together; unique_indices (dest is a permutation): plain stores, no atomics
  dest = dest.reshape(-1, m)
  rows = jnp.broadcast_to(jnp.arange(dest.shape[0])[:, None], dest.shape)
  place = lambda x: jnp.zeros_like(x).at[rows, dest].set(x, unique_indices=True)   # noqa: E731
  if len({x.dtype for x in xs}) != 1:
    return [place(x.reshape(dest.shape)).reshape(x.shape) for x in xs]
  out = place(jnp.stack([x.reshape(dest.shape) for x in xs], axis=-1))
  return [out[..., i].reshape(x.shape) for i, x in enumerate(xs)]


def canonical_columns(columns: Columns, last, s: int, causal: bool) -> Columns:
  """The kernel's column form, same key sets. A per-query-block list ([B, H, nq, n]) is sorted,
  duplicate-free and in [0, s), its count causally clipped at the block's last row `last` [nq, 1].
  A shared list ([B, H, 1, n]) keeps its order (block qb takes the first count[qb] entries), with
  out-of-range entries and repeats of an earlier entry replaced by -1 (masked in the kernel); one
  that promises `ascending` (the builders') is taken as it is.
  Columns inside listed blocks or ranges are left to the kernel, which masks them."""
  cols = columns.index.astype(jnp.int32)
  slots = jnp.arange(cols.shape[-1], dtype=jnp.int32)
  if cols.shape[2] == 1 and columns.ascending:   # the promise: ascending, distinct, in [0, s)
    return Columns(jnp.clip(columns.count, 0, cols.shape[-1]).astype(jnp.int32), cols, True)
  if cols.shape[2] == 1:
    ok = (cols >= 0) & (cols < s)
    order = jnp.argsort(jnp.where(ok, cols, s), axis=-1, stable=True)
    srt = jnp.take_along_axis(jnp.where(ok, cols, s), order, axis=-1)
    rep = jnp.concatenate([jnp.zeros_like(srt[..., :1], bool), srt[..., 1:] == srt[..., :-1]], axis=-1)
    rep = jnp.take_along_axis(rep, jnp.argsort(order, axis=-1), axis=-1)  # back to list order
    cols = jnp.where(ok & ~rep, cols, -1)
    return Columns(jnp.clip(columns.count, 0, cols.shape[-1]).astype(jnp.int32), cols, columns.ascending)
  okc = (slots < columns.count[..., None]) & (cols >= 0) & (cols < s)
  if causal:
    okc = okc & (cols <= last)
  cols, n = _sort_dedupe(cols, okc, s)
  return Columns(n, jnp.where(cols == s, 0, cols))


def blocks_from_mask(block_mask, max_blocks: int, *, block_q: int, block_k: int) -> BlockSparse:
  """BlockSparse from any method's block selection block_mask [B, H, nq, nk] bool (e.g. top-k of
  pooled scores). Lists are ascending. If a row selects more than `max_blocks` blocks, the
  `max_blocks` highest-indexed ones (closest to the diagonal) are kept and the rest are dropped."""
  if block_mask.ndim != 4 or block_mask.dtype != jnp.bool_:
    raise ValueError(f"block_mask must be a bool [B, H, nq, nk] array, got {block_mask.dtype} "
                     f"{tuple(block_mask.shape)}")
  if not isinstance(max_blocks, int) or max_blocks < 1:
    raise ValueError(f"max_blocks must be a static int >= 1, got {max_blocks!r}")
  nk = block_mask.shape[-1]
  kb = jnp.arange(nk, dtype=jnp.int32)
  # descending order of selected blocks first: top max_blocks of (selected ? index : -1)
  key = jnp.where(block_mask, kb, -1)
  m = min(max_blocks, nk)
  top = lax.top_k(key, m)[0]                                    # descending, -1 = not selected
  count = jnp.sum(top >= 0, axis=-1).astype(jnp.int32)
  top = jnp.sort(jnp.where(top >= 0, top, nk), axis=-1)         # ascending, padding at the end
  top = jnp.where(top == nk, 0, top)
  if m < max_blocks:
    top = jnp.pad(top, [(0, 0)] * 3 + [(0, max_blocks - m)])
  return BlockSparse(count, top.astype(jnp.int32), block_q, block_k)


def check_vertical_slash_args(vertical_idx, slash_idx, **statics) -> None:
  """ValueError for a malformed vertical-slash index: integer [B, H, n] arrays sharing [B, H], at
  least one slash, and positive static ints (seq_len, block sizes, list lengths)."""
  for name, x in (("vertical_idx", vertical_idx), ("slash_idx", slash_idx)):
    if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer [B, H, n] array, got {x.dtype} {tuple(x.shape)}")
  if vertical_idx.shape[:2] != slash_idx.shape[:2]:
    raise ValueError(f"vertical_idx and slash_idx must share [B, H], got {tuple(vertical_idx.shape)} "
                     f"and {tuple(slash_idx.shape)}")
  if slash_idx.shape[-1] == 0:
    raise ValueError("slash_idx needs at least one entry (pad with -1; MInference keeps offset 0)")
  for name, x in statics.items():
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
      raise ValueError(f"{name} must be a static int >= 1, got {x!r}")


def sorted_slash_offsets(slash_idx, t: int):
  """Slash offsets sorted descending per head (ascending key start); entries outside [0, t) become
  2t, which sorts first and reaches no key of any block."""
  o = slash_idx.astype(jnp.int32)
  return -jnp.sort(-jnp.where((o >= 0) & (o < t), o, 2 * t), axis=-1)


def row_prefix_sum(x, bound: int | None = None):
  """Inclusive prefix sum along the last axis, int32. With `bound` (static; the caller promises
  0 <= x < bound) and short rows (n <= 512, n * bound < 2**24) it is one bf16 GEMM against a
  triangular matrix of ones, x split into bytes: bf16 holds 0..256 exactly and float32 sums of
  integers below 2**24 are exact, so the result equals jnp.cumsum's. XLA lowers jnp.cumsum to a
  windowed reduction (H200: ~0.2 ms for 75K rows of 160, the vertical-slash builder's merge);
  the GEMM is tensor-core work."""
  n = x.shape[-1]
  if bound is None or bound > 1 << 16 or n > 512 or n * bound >= 1 << 24:
    return jnp.cumsum(x, axis=-1, dtype=jnp.int32)
  x = x.astype(jnp.int32)
  tri = (jnp.arange(n)[:, None] <= jnp.arange(n)[None, :]).astype(jnp.bfloat16)   # [n, n]: j <= k
  parts, mats = [x], [tri]
  if bound > 256:
    parts, mats = [x & 255, jnp.right_shift(x, 8)], [tri, tri * 256]
  xs = jnp.concatenate([p.astype(jnp.bfloat16) for p in parts], axis=-1)
  return jnp.matmul(xs, jnp.concatenate(mats, axis=0), preferred_element_type=jnp.float32).astype(jnp.int32)


def merge_into_pieces(lo, hi, valid, bk: int, max_ranges: int, align: int = 1, disjoint: bool = False):
  """Key ranges [lo, hi] (inclusive; per row sorted by lo, `valid` marks real ones, and every
  invalid entry precedes the valid ones, as descending offsets give: the slashes or runs a block
  cannot reach are the farthest) merged into disjoint runs, cut into bk-long pieces; the
  max_ranges pieces with the highest keys are kept. With bk = 1 and lo / hi in block units it
  lists blocks (the grid-aligned builder). Pieces are cut at multiples of `align` (each lies in
  a window [a, a + bk) with a % align == 0; the first piece of a run may start later inside its
  window), so that kernels whose loads must start at aligned rows load each piece once. Returns
  (count [..], start [.., max_ranges], stop [.., max_ranges]) (stop exclusive). disjoint=True: the
  caller promises the valid ranges neither overlap nor touch (each is its own run), and the merge's
  two running maxima are skipped (H200, 128K, 6096 slashes: ~0.3-0.5 ms). The prefix sums over the
  entries are GEMMs where rows are short (`row_prefix_sum`)."""
  hi = jnp.where(valid, hi, -2)                               # inclusive end (-2: none, below any run)
  if disjoint:
    covered, run_lo, last_of_run = hi, jnp.where(valid, lo, -1), valid
  else:
    covered = lax.cummax(hi, axis=hi.ndim - 1)                # union so far ends here (inclusive)
    before = jnp.concatenate([jnp.full_like(covered[..., :1], -2), covered[..., :-1]], axis=-1)
    new_run = valid & (lo > before + 1)                       # a gap: a new run starts
    run_lo = lax.cummax(jnp.where(new_run, lo, -1), axis=lo.ndim - 1)
    after = jnp.concatenate([new_run[..., 1:], jnp.ones_like(new_run[..., :1])], axis=-1)
    last_of_run = valid & after & (covered >= run_lo)
  run_al = run_lo - run_lo % align                            # the run's first aligned window
  pieces = jnp.where(last_of_run, (covered - run_al + bk) // bk, 0)   # ceil(len / bk) in windows
  # a run's pieces below its last max_ranges can never be kept: drop them here (its first window
  # moves up), so that pieces <= max_ranges and the prefix sum below is one byte-wide GEMM
  extra = jnp.maximum(pieces - max_ranges, 0)
  pieces, run_al = pieces - extra, run_al + extra * bk
  end = row_prefix_sum(pieces, max_ranges + 1)
  total = end[..., -1:]
  count = jnp.minimum(total, max_ranges)[..., 0].astype(jnp.int32)
  skipped = jnp.maximum(total - max_ranges, 0)                # the lowest pieces, dropped
  rank = skipped + jnp.arange(max_ranges, dtype=jnp.int32)
  # seg[r]: the entry whose run holds piece rank[r] = how many runs end (cumulative pieces) at or
  # before it: a histogram of the ends, then a prefix sum (no binary search per piece)
  ends = jnp.clip(end - skipped, -1, max_ranges).reshape(-1, end.shape[-1]) + 1
  hist = jax.vmap(lambda e: jnp.zeros(max_ranges + 2, jnp.int32).at[e].add(1))(ends)
  seg = row_prefix_sum(hist, lo.shape[-1] + 1)[:, 1:max_ranges + 1].reshape(rank.shape)
  seg = jnp.minimum(seg, lo.shape[-1] - 1)
  # one gather of the run's four fields (16 bytes an entry) instead of four
  run = jnp.stack([end - pieces, run_al, run_lo, covered], axis=-1).astype(jnp.int32)
  first_piece, run_al, run_lo, covered = jnp.moveaxis(
      jnp.take_along_axis(run, seg[..., None], axis=-2), -1, 0)
  window = run_al + (rank - first_piece) * bk
  start = jnp.maximum(window, run_lo)
  stop = jnp.minimum(window + bk, covered + 1)
  slot_ok = jnp.arange(max_ranges) < count[..., None]
  return count, jnp.where(slot_ok, start, 0).astype(jnp.int32), jnp.where(slot_ok, stop, 0).astype(jnp.int32)


def vertical_slash_to_layout(vertical_idx, slash_idx, seq_len: int, block_q: int, block_k: int,
                             max_blocks: int, max_cols: int):
  """MInference's vertical-slash index (Jiang et al. 2024), as grid-aligned blocks plus columns.

  vertical_idx [B, H, V] int: key columns every query (at or after them) attends.
  slash_idx [B, H, S] int: diagonal offsets o >= 0; query i attends key i - o.
  Entries outside [0, seq_len) are ignored (use -1 as padding). Causal self-attention, T = seq_len.

  For query block [q0, q1] a slash o touches keys [max(q0 - o, 0), q1 - o] (empty if q1 < o), i.e.
  KV blocks [max(q0 - o, 0) // block_k, (q1 - o) // block_k]. These ranges are merged (sorted by
  start; each range minus everything already covered) into a disjoint ascending block list. If it
  is longer than `max_blocks`, the highest blocks (nearest the diagonal) are kept and the lowest
  dropped. The verticals become gathered columns as in `shared_vertical_columns` (one ascending
  list per head, the lowest `max_cols` kept; each query block takes those <= q1, and the kernel
  skips those inside a kept block). Block granularity over-covers: every required key
  {k <= q : k in verticals or q - k in slashes} is attended (unless truncated), plus the other
  keys of the selected blocks (causal). Returns (BlockSparse, Columns). Jittable, no [T, T] array.
  """
  check_vertical_slash_args(vertical_idx, slash_idx, seq_len=seq_len, block_q=block_q, block_k=block_k,
                            max_blocks=max_blocks, max_cols=max_cols)
  t, bk = seq_len, block_k
  nq = -(-t // block_q)
  q0 = (jnp.arange(nq, dtype=jnp.int32) * block_q)[:, None]    # [nq, 1]
  q1 = _last_q_row(nq, block_q, t)[:, None]
  # slashes -> block ranges [max(q0 - o, 0) // bk, (q1 - o) // bk], merged: pieces of one block
  o = sorted_slash_offsets(slash_idx, t)[:, :, None, :]
  count, blocks, _ = merge_into_pieces(jnp.maximum(q0 - o, 0) // bk, (q1 - o) // bk, q1 - o >= 0, 1,
                                       max_blocks)
  layout = BlockSparse(count, blocks, block_q, block_k)
  return layout, shared_vertical_columns(vertical_idx, t, q1, max_cols)


def shared_vertical_columns(vertical_idx, t: int, q1, max_cols: int) -> Columns:
  """Vertical lines as one ascending, duplicate-free column list per head (index [B, H, 1, n],
  n <= max_cols: the lowest kept), of which query block qb takes the prefix of columns <= its last
  row q1[qb] (q1: [nq, 1]). The kernel skips columns inside the block's listed keys, so nothing
  per query block is built here beyond the counts."""
  c = vertical_idx.astype(jnp.int32)
  c = _sort_dedupe(c, (c >= 0) & (c < t), t)[0][..., :max_cols]       # ascending; t = no entry
  count = count_at_most(c, q1[:, 0])
  return Columns(count.astype(jnp.int32), jnp.where(c < t, c, 0)[:, :, None, :], ascending=True)

