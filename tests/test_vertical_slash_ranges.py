"""KeyRanges (pallas_kernels/vertical_slash.py): the MInference-style index built on device, and the
block-sparse kernel over unaligned ranges, against numpy models and the float32 oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle, self_attention_qkv as _qkv
from lcinfer.pallas_kernels.block_sparse import block_sparse_attention
from lcinfer.pallas_kernels.reference import block_sparse_reference
from lcinfer.pallas_kernels.sparse_index import Columns, row_prefix_sum, stable_partition
from lcinfer.pallas_kernels.vertical_slash import (KeyRanges, ascending_ranges, canonicalize_ranges,
                                                   vertical_slash_to_ranges)

NAN = float("nan")


def _pattern(rng, b, h, t, nv, ns):
  vert = rng.integers(0, t, (b, h, nv)).astype(np.int32)
  vert[0, 0, :2] = [-1, 10 * t]                     # padding / out of range: ignored
  if h > 1:
    vert[0, 1, :2] = vert[0, 1, 2]                  # duplicates
  slash = rng.integers(0, t, (b, h, ns)).astype(np.int32)
  slash[:, :, 0] = 0                                # the diagonal
  slash[:, :, 1] = 1                                # adjacent to it: runs merge
  if h > 2:
    slash[0, 2, 2:] = -1
  return vert, slash


@pytest.mark.parametrize("t,bq,bk", [(64, 16, 16), (100, 32, 16), (100, 16, 32), (77, 16, 64)])
def test_index_is_exactly_the_union_of_slash_ranges_plus_columns(t, bq, bk):
  rng = np.random.default_rng(t * 3 + bq + bk)
  b, h = 2, 3
  vert, slash = _pattern(rng, b, h, t, 7, 5)
  nq = -(-t // bq)
  f = jax.jit(vertical_slash_to_ranges, static_argnums=(2, 3, 4, 5, 6))
  ranges, cols = f(jnp.asarray(vert), jnp.asarray(slash), t, bq, bk, t, 8)
  cnt, lo, hi = (np.asarray(x) for x in (ranges.count, ranges.start, ranges.end))
  ccnt, cidx = np.asarray(cols.count), np.asarray(cols.index)
  for i in np.ndindex(b, h, nq):
    q0, q1 = i[2] * bq, min((i[2] + 1) * bq, t) - 1
    want = set()                                   # keys a slash reaches from some row of the block
    for o in slash[i[:2]]:
      if 0 <= o <= q1:
        want |= set(range(max(q0 - o, 0), q1 - o + 1))
    got = []
    for j in range(cnt[i]):
      assert 0 < hi[i][j] - lo[i][j] <= bk and 0 <= lo[i][j] and hi[i][j] <= q1 + 1
      got += list(range(lo[i][j], hi[i][j]))
    assert len(got) == len(set(got)), "ranges overlap"
    assert set(got) == want, i
    assert list(lo[i][:cnt[i]]) == sorted(lo[i][:cnt[i]])
    # merged: a run of adjacent keys is cut into block_k pieces at 8-aligned windows, so the count
    # is minimal: ceil((len + misalignment of its start) / bk) per run
    starts = [kk for kk in want if kk - 1 not in want]
    lens = [next(n for n in range(1, t + 2) if a + n not in want) for a in starts]
    assert cnt[i] == sum(-(-(n + a % 8) // bk) for a, n in zip(starts, lens))
    # one sorted list per head; the block's prefix is every vertical up to its last row (those
    # inside a range are masked by the kernel, not dropped here)
    assert cidx.shape[2] == 1
    cs = list(cidx[i[0], i[1], 0][:ccnt[i]])
    assert cs == sorted({c for c in vert[i[:2]] if 0 <= c <= q1})


def _brute_force_pieces(slash, t, bq, bk, max_ranges):
  """Per block: the keys some slash reaches, split into maximal contiguous runs, each cut into
  pieces at windows [w, w + bk) with w = (its start rounded down to a multiple of 8) + i * bk; the
  max_ranges highest pieces kept. [(start, stop), ...]."""
  out = []
  for qb in range(-(-t // bq)):
    q0, q1 = qb * bq, min((qb + 1) * bq, t) - 1
    keys = sorted({kk for o in slash if 0 <= o <= q1 for kk in range(max(q0 - o, 0), q1 - o + 1)})
    pieces, i = [], 0
    while i < len(keys):
      j = i
      while j + 1 < len(keys) and keys[j + 1] == keys[j] + 1:
        j += 1
      pieces += [(max(w, keys[i]), min(w + bk, keys[j] + 1))
                 for w in range(keys[i] - keys[i] % 8, keys[j] + 1, bk)]
      i = j + 1
    out.append(pieces[-max_ranges:])
  return out


@pytest.mark.parametrize("t,bq,bk,max_ranges", [(200, 16, 16, 3), (150, 32, 16, 5), (97, 16, 32, 2),
                                                (128, 64, 64, 4)])
def test_index_equals_brute_force_with_truncation(t, bq, bk, max_ranges):
  """The offset-space run merge (full blocks) and the direct merge (a short last block) against a
  brute force, with near runs, far slashes, clipping at key 0 and truncation all in play."""
  rng = np.random.default_rng(t + max_ranges)
  h = 4
  slash = np.concatenate([np.tile(np.arange(6), (1, h, 1)),                 # a near run
                          rng.integers(0, t, (1, h, 7)),                      # far, random
                          np.full((1, h, 2), -1)], -1).astype(np.int32)       # padding
  slash[0, 1, 6:9] = [40, 40 + bq, 40 + 2 * bq + 1]                         # gaps bq (joins) / bq + 1
  ranges, _ = vertical_slash_to_ranges(jnp.zeros((1, h, 1), jnp.int32), jnp.asarray(slash), t, bq, bk,
                                       max_ranges, 1)
  cnt, lo, hi = (np.asarray(x) for x in (ranges.count, ranges.start, ranges.end))
  saturated = np.asarray(ranges.saturated())
  for hh in range(h):
    want = _brute_force_pieces(slash[0, hh], t, bq, bk, max_ranges)
    whole = _brute_force_pieces(slash[0, hh], t, bq, bk, 10 ** 6)
    for qb, pieces in enumerate(want):
      got = list(zip(lo[0, hh, qb][:cnt[0, hh, qb]], hi[0, hh, qb][:cnt[0, hh, qb]]))
      assert got == pieces, (hh, qb, got, pieces)
      # saturated: the list is full, which every block that lost pieces is (and no other block is
      # unless it holds exactly max_ranges)
      assert saturated[0, hh, qb] == (len(whole[qb]) >= max_ranges), (hh, qb)


@pytest.mark.parametrize("t,bq,bk,max_ranges,align", [(300, 56, 64, 6, 8), (250, 16, 32, 3, 1), (333, 128, 128, 40, 8),
                                                      (200, 64, 64, 2, 4)])
def test_builder_keeps_its_canonical_promise(t, bq, bk, max_ranges, align):
  """The builder's lists are marked canonical, so the kernels take them without sorting: they must
  be exactly what the sorting path makes of them (ascending, disjoint, clipped, each piece inside
  one aligned window: the second halves of the aligned split stay empty), truncated lists and a
  short last block included; the whole-first order is the same either way."""
  rng = np.random.default_rng(t + bk)
  vert, slash = _pattern(rng, 2, 3, t, 9, 12)
  ranges, cols = vertical_slash_to_ranges(jnp.asarray(vert), jnp.asarray(slash), t, bq, bk, max_ranges, 16)
  assert ranges.canonical and bool(jnp.any(ranges.saturated())) == (max_ranges < 10)
  sorted_ = dataclasses.replace(ranges, canonical=False)
  for causal in (True, False):
    fast, slow = (ascending_ranges(r, cols, t, t, causal, align) for r in (ranges, sorted_))
    m = ranges.max_ranges
    np.testing.assert_array_equal(fast[2], slow[2])                                  # counts
    for f, s in zip((fast[0], fast[1], fast[3]), (slow[0], slow[1], slow[3])):       # lo, hi, whole
      np.testing.assert_array_equal(f, s[..., :m])
      assert not np.asarray(s[..., m:]).any()
    fast, slow = (canonicalize_ranges(r, cols, t, t, causal, align) for r in (ranges, sorted_))
    for f, s in zip(fast[:4], slow[:4]):
      np.testing.assert_array_equal(f, s[..., :m] if f.ndim == 4 else s)


@pytest.mark.parametrize("n, bound", [(1, 2), (160, 2049), (162, 257), (300, 256), (512, 30000), (513, 9)])
def test_row_prefix_sum_equals_cumsum(n, bound):
  """The GEMM prefix sum (bytes in bf16, float32 sums) is exact up to its limits, including values
  bound - 1 in every slot (the largest sums); 513-long rows take jnp.cumsum."""
  rng = np.random.default_rng(n)
  x = rng.integers(0, bound, (3, 4, n))
  x[0, 0] = bound - 1
  got = jax.jit(row_prefix_sum, static_argnums=1)(jnp.asarray(x, jnp.int32), bound)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.cumsum(x, axis=-1))


@pytest.mark.parametrize("m", [33, 300])   # per-class counters: 4 in one word / 2 a word
def test_stable_partition_is_a_stable_sort_by_class(m):
  rng = np.random.default_rng(3)
  cls = rng.integers(0, 4, (5, 7, m))
  x = rng.integers(-100, 100, cls.shape)
  got, = stable_partition(jnp.asarray(cls), jnp.asarray(x))
  order = np.argsort(cls, axis=-1, kind="stable")
  np.testing.assert_array_equal(got, np.take_along_axis(x, order, -1))


def test_truncation_keeps_the_ranges_nearest_the_diagonal():
  t, bq, bk = 64, 16, 16
  slash = jnp.asarray([[[0, 20, 45]]], jnp.int32)   # last block [48, 63]: keys 48-63, 28-43, 3-18
  vert = jnp.asarray([[[60, 2, 33, 5, 9]]], jnp.int32)
  ranges, cols = vertical_slash_to_ranges(vert, slash, t, bq, bk, 2, 2)
  c, lo, hi = int(ranges.count[0, 0, 3]), np.asarray(ranges.start)[0, 0, 3], np.asarray(ranges.end)[0, 0, 3]
  # pieces at 8-aligned 16-key windows: 3-18 -> [3, 16) [16, 19); 28-43 -> [28, 40) [40, 44); 48-63
  assert c == 2 and list(zip(lo, hi)) == [(40, 44), (48, 64)]
  assert list(np.asarray(cols.index)[0, 0, 0][:int(cols.count[0, 0, 3])]) == [2, 5]  # lowest first


def _check_kernel(name, q, k, v, layout, cols, dtype, scale, interpret=True, **kernel_kw):
  """The kernel (outputs NaN-poisoned) against the float32 oracle on the same layout."""
  out, lse = block_sparse_attention(q, k, v, layout, scale=scale, columns=cols, interpret=interpret,
                                    _poison=NAN, **kernel_kw)
  ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=scale, columns=cols, out_dtype=jnp.float32)
  assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)


def _random_ranges(rng, b, h, t, bq, bk, m):
  """Arbitrary user ranges: overlapping, too long (cut to block_k), empty, out of range, garbage past count."""
  nq = -(-t // bq)
  start = rng.integers(-bk, t + bk, (b, h, nq, m)).astype(np.int32)
  end = start + rng.integers(-2, 2 * bk, (b, h, nq, m)).astype(np.int32)
  count = rng.integers(0, m + 1, (b, h, nq)).astype(np.int32)
  return KeyRanges(jnp.asarray(count), jnp.asarray(start), jnp.asarray(end), bq, bk)


@pytest.mark.parametrize("t,h,kh,d,bq,bk,dtype,with_cols", [
    (100, 4, 1, 64, 16, 32, "float32", True),
    (64, 2, 2, 128, 32, 16, "float32", False),
    (90, 8, 2, 64, 16, 16, "bfloat16", True),
])
def test_kernel_on_arbitrary_ranges_matches_oracle(t, h, kh, d, bq, bk, dtype, with_cols):
  rng = np.random.default_rng(t + h + bq)
  b = 2
  q, k, v = _qkv(rng, b, t, h, kh, d, dtype)
  ranges = _random_ranges(rng, b, h, t, bq, bk, 6)
  cols = None
  if with_cols:
    nq = -(-t // bq)
    cols = Columns(jnp.asarray(rng.integers(0, 9, (b, h, nq)), jnp.int32),
                   jnp.asarray(rng.integers(-3, t + 3, (b, h, nq, 8)), jnp.int32))
  _check_kernel("ranges", q, k, v, ranges, cols, dtype, d ** -0.5)


def test_kernel_on_vertical_slash_ranges_matches_oracle():
  rng = np.random.default_rng(5)
  b, t, h, kh, d = 1, 128, 4, 2, 64
  vert, slash = _pattern(rng, b, h, t, 9, 6)
  ranges, cols = vertical_slash_to_ranges(jnp.asarray(vert), jnp.asarray(slash), t, 32, 32, 12, 16)
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  _check_kernel("vs ranges", q, k, v, ranges, cols, "float32", 0.125, column_chunk=16)


def test_shared_column_list_with_garbage_matches_oracle():
  """A shared per-head list, unsorted, with repeats and out-of-range entries, and per-block prefix
  counts: block qb attends entries j < count[qb]; repeats count once; columns inside a range once."""
  rng = np.random.default_rng(11)
  b, t, h, kh, d, bq, bk = 1, 96, 2, 1, 64, 32, 16
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  ranges = _random_ranges(rng, b, h, t, bq, bk, 4)
  idx = rng.integers(-5, t + 5, (b, h, 1, 12)).astype(np.int32)
  idx[0, 0, 0, 3] = idx[0, 0, 0, 1]
  cols = Columns(jnp.asarray([[[2, 7, 12]] * h], jnp.int32), jnp.asarray(idx))
  _check_kernel("shared cols", q, k, v, ranges, cols, "float32", 0.125, column_chunk=16)


def test_bad_ranges_raise():
  q = jnp.ones((1, 32, 2, 64), jnp.float32)
  r = KeyRanges(jnp.ones((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2, 3), jnp.int32),
                jnp.zeros((1, 2, 2, 4), jnp.int32), 16, 16)
  with pytest.raises(ValueError, match=r"ranges.end must have shape \(1, 2, 2, 3\)"):
    block_sparse_attention(q, q, q, r, scale=0.1, interpret=True)
  r = KeyRanges(jnp.ones((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2, 3), jnp.float32),
                jnp.zeros((1, 2, 2, 3), jnp.int32), 16, 16)
  with pytest.raises(ValueError, match="ranges.start must be an integer array"):
    block_sparse_attention(q, q, q, r, scale=0.1, interpret=True)
  r = KeyRanges(jnp.ones((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2, 3), jnp.int32),
                jnp.ones((1, 2, 2, 3), jnp.int32), 16, 16, canonical="yes")
  with pytest.raises(ValueError, match="ranges.canonical must be a static bool"):
    block_sparse_attention(q, q, q, r, scale=0.1, interpret=True)
  with pytest.raises(ValueError, match="max_ranges must be a static int"):
    vertical_slash_to_ranges(jnp.ones((1, 1, 2), jnp.int32), jnp.ones((1, 1, 2), jnp.int32), 64, 16, 16, 0, 4)


@pytest.mark.gpu
def test_vertical_slash_ranges_gpu_long():
  rng = np.random.default_rng(0)
  b, t, h, kh, d = 1, 1000, 8, 2, 128
  vert, slash = _pattern(rng, b, h, t, 64, 32)
  ranges, cols = vertical_slash_to_ranges(jnp.asarray(vert), jnp.asarray(slash), t, 64, 64, 48, 64)
  q, k, v = _qkv(rng, b, t, h, kh, d, "bfloat16")
  _check_kernel("vs ranges gpu", q, k, v, ranges, cols, "bfloat16", d ** -0.5, interpret=False)
  r2 = _random_ranges(rng, b, h, t, 64, 64, 10)
  _check_kernel("random ranges gpu", q, k, v, r2, None, "bfloat16", d ** -0.5, interpret=False)
