"""Block-sparse attention: the Pallas kernel (interpret mode on CPU) against its float32 oracle,
the on-device index construction (block masks, vertical-slash), and bad inputs. GPU-compiled
variants are marked `gpu`."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle
from lcinfer.pallas_kernels import block_sparse, dispatch
from lcinfer.pallas_kernels.block_sparse import block_sparse_attention
from lcinfer.pallas_kernels.reference import (block_sparse_key_mask, block_sparse_reference,
                                              masked_attention_reference)
from lcinfer.pallas_kernels.sparse_index import (BlockSparse, Columns, blocks_from_mask,
                                                 vertical_slash_to_layout)

NAN = float("nan")

# (name, B, T, H, K, D, dtype, block_q, block_k, columns, causal)
CASES = [
    ("t64_g1", 1, 64, 2, 2, 64, "float32", 16, 16, False, True),
    ("t100_g4_cols", 1, 100, 4, 1, 64, "float32", 32, 16, True, True),
    ("t100_bq16_bk32_cols", 2, 100, 4, 4, 64, "float32", 16, 32, True, True),
    ("t64_noncausal_cols", 1, 64, 4, 1, 64, "float32", 16, 32, True, False),
    ("bf16_t100_g4_cols", 1, 100, 4, 1, 64, "bfloat16", 32, 32, True, True),
    ("bf16_t64_d128", 1, 64, 2, 1, 128, "bfloat16", 16, 16, False, True),
]


def _random_layout(rng, b, h, t, bq, bk, max_blocks, with_cols, max_cols=8):
  """Duplicate-free random block lists (counts include 0), garbage beyond each count."""
  nq, nk = -(-t // bq), -(-t // bk)
  idx = rng.integers(-1000, 1000, (b, h, nq, max_blocks)).astype(np.int32)  # garbage everywhere
  cnt = np.zeros((b, h, nq), np.int32)
  for i in np.ndindex(b, h, nq):
    n = int(rng.integers(0, min(max_blocks, nk) + 1))
    cnt[i] = n
    idx[i][:n] = rng.choice(nk, n, replace=False)
  cnt[0, 0, -1] = 0  # a row that lists nothing
  layout = BlockSparse(jnp.asarray(cnt), jnp.asarray(idx), bq, bk)
  cols = None
  if with_cols:
    cidx = rng.integers(-1000, 1000, (b, h, nq, max_cols)).astype(np.int32)
    ccnt = rng.integers(0, max_cols + 1, (b, h, nq)).astype(np.int32)
    for i in np.ndindex(b, h, nq):
      cidx[i][:ccnt[i]] = rng.choice(t, ccnt[i], replace=False)
    ccnt[0, 0, -1] = 0
    cols = Columns(jnp.asarray(ccnt), jnp.asarray(cidx))
  return layout, cols


def _inputs(rng, b, t, h, kh, d, dtype):
  return tuple(jnp.asarray(rng.standard_normal(sh), dtype)
               for sh in ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))


def _compare(out, lse, ref, ref_lse, dtype, name=""):
  empty = assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)
  return empty


def _check_case(case, interpret, seed):
  name, b, t, h, kh, d, dtype, bq, bk, with_cols, causal = case
  rng = np.random.default_rng(seed)
  q, k, v = _inputs(rng, b, t, h, kh, d, jnp.dtype(dtype))
  layout, cols = _random_layout(rng, b, h, t, bq, bk, 3, with_cols)
  scale = d ** -0.5
  out, lse = block_sparse_attention(q, k, v, layout, scale=scale, causal=causal, columns=cols,
                                    interpret=interpret, _poison=NAN)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, t, h)
  ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=scale, causal=causal, columns=cols,
                                        out_dtype=jnp.float32)
  return _compare(out, lse, ref, ref_lse, dtype, name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_interpret(case):
  _check_case(case, interpret=True, seed=zlib.crc32(case[0].encode()))


def test_empty_rows_are_zero_and_neginf():
  # query block nq-1 of (b 0, h 0) lists nothing (no blocks, no columns): out 0, lse -inf
  empty = _check_case(CASES[1], interpret=True, seed=1)
  assert empty[0, 96:, 0].all() and (~empty).any()


def test_duplicates_out_of_range_and_garbage_follow_union_semantics():
  """Within count: duplicate blocks, out-of-range blocks, columns inside listed blocks, duplicate
  and out-of-range columns; beyond count: garbage. Union semantics: each key once, bad ones ignored."""
  rng = np.random.default_rng(7)
  b, t, h, kh, d, bq, bk = 1, 100, 4, 1, 64, 32, 16
  q, k, v = _inputs(rng, b, t, h, kh, d, jnp.float32)
  nq = 4
  idx = np.array([[2, 2, -1, 7, 0, 1000], [0, 99, 0, 0, 3, 3], [5, 6, 6, 4, -7, 1 << 30],
                  [6, 5, 4, 3, 2, 1]], np.int32)
  cnt = np.array([5, 6, 4, 0], np.int32)
  layout = BlockSparse(jnp.broadcast_to(jnp.asarray(cnt), (b, h, nq)),
                       jnp.broadcast_to(jnp.asarray(idx), (b, h, nq, 6)), bq, bk)
  cidx = np.array([[33, 33, 40, 100, -1, 5], [0, 1, 2, 50, 99, 99], [70, 71, 72, 73, 74, 75],
                   [99, 98, 10, 10, 200, -5]], np.int32)
  ccnt = np.array([6, 6, 3, 5], np.int32)
  cols = Columns(jnp.broadcast_to(jnp.asarray(ccnt), (b, h, nq)),
                 jnp.broadcast_to(jnp.asarray(cidx), (b, h, nq, 6)))
  for causal in (True, False):
    out, lse = block_sparse_attention(q, k, v, layout, scale=0.125, causal=causal, columns=cols,
                                      interpret=True, _poison=NAN)
    ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=0.125, causal=causal, columns=cols)
    _compare(out, lse, ref, ref_lse, "float32", f"union causal={causal}")
    # the oracle's key set, written out: query 40 (block 1) sees blocks {0, 3} and columns
    mask = np.asarray(block_sparse_key_mask(layout, cols, t, t, causal))[0, 0]
    want = set(range(0, 16)) | set(range(48, 64)) | {0, 1, 2, 50, 99}
    want = {j for j in want if not causal or j <= 40}
    assert set(np.flatnonzero(mask[40])) == want


def test_garbage_beyond_count_is_ignored():
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, 1, 64, 2, 1, 64, jnp.float32)
  layout, cols = _random_layout(rng, 1, 2, 64, 16, 16, 4, True)
  out, lse = block_sparse_attention(q, k, v, layout, scale=0.1, columns=cols, interpret=True)
  j = np.arange(4)
  clean_idx = jnp.where(j < layout.count[..., None], layout.kv_block_idx, 0)
  jc = np.arange(cols.max_cols)
  clean_cols = jnp.where(jc < cols.count[..., None], cols.index, 0)
  out2, lse2 = block_sparse_attention(q, k, v, BlockSparse(layout.count, clean_idx, 16, 16),
                                      scale=0.1, columns=Columns(cols.count, clean_cols),
                                      interpret=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse2))


def test_poison_exposes_unwritten_outputs(monkeypatch):
  def lazy_kernel(*refs, **kw):
    pass
  monkeypatch.setattr(block_sparse, "_kernel", lazy_kernel)
  q = jnp.ones((1, 3, 2, 64), jnp.float32)  # a fresh trace
  layout = BlockSparse(jnp.ones((1, 2, 1), jnp.int32), jnp.zeros((1, 2, 1, 1), jnp.int32), 16, 16)
  out, lse = block_sparse_attention(q, q, q, layout, scale=0.1, interpret=True, _poison=NAN)
  assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()


def test_kernel_under_jit_with_runtime_layout():
  rng = np.random.default_rng(11)
  q, k, v = _inputs(rng, 1, 64, 2, 2, 64, jnp.float32)
  mask = jnp.asarray(rng.random((1, 2, 4, 4)) < 0.5)

  @jax.jit
  def f(q, k, v, mask):
    layout = blocks_from_mask(mask, 4, block_q=16, block_k=16)
    return block_sparse_attention(q, k, v, layout, scale=0.1, interpret=True)
  out, lse = f(q, k, v, mask)
  ref, ref_lse = block_sparse_reference(q, k, v, blocks_from_mask(mask, 4, block_q=16, block_k=16),
                                        scale=0.1)
  _compare(out, lse, ref, ref_lse, "float32")


# -- index construction ---------------------------------------------------------------------------
def test_blocks_from_mask_key_set_and_truncation():
  rng = np.random.default_rng(5)
  bm = rng.random((2, 3, 5, 7)) < 0.4
  bm[0, 0, 0] = False
  layout = jax.jit(blocks_from_mask, static_argnums=1, static_argnames=("block_q", "block_k"))(
      jnp.asarray(bm), 7, block_q=16, block_k=16)
  cnt, idx = np.asarray(layout.count), np.asarray(layout.kv_block_idx)
  for i in np.ndindex(2, 3, 5):
    assert list(idx[i][:cnt[i]]) == list(np.flatnonzero(bm[i]))
  small = blocks_from_mask(jnp.asarray(bm), 2, block_q=16, block_k=16)
  for i in np.ndindex(2, 3, 5):
    n = min(2, bm[i].sum())
    assert small.count[i] == n
    assert list(np.asarray(small.kv_block_idx)[i][:n]) == list(np.flatnonzero(bm[i])[::-1][:n][::-1])
  # saturated = the list is full: every block that lost entries, and those with exactly 2
  np.testing.assert_array_equal(np.asarray(small.saturated()), bm.sum(-1) >= 2)
  np.testing.assert_array_equal(np.asarray(layout.saturated()), bm.sum(-1) >= 7)


def _vs_required_mask(vert, slash, t):
  """Dense [B, H, T, T] mask from the definitions (test only): k <= q and (k in verticals or
  q - k in slashes)."""
  b, h = vert.shape[:2]
  m = np.zeros((b, h, t, t), bool)
  qq, kk = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
  for i in np.ndindex(b, h):
    vs = {c for c in vert[i] if 0 <= c < t}
    ss = {o for o in slash[i] if 0 <= o < t}
    m[i] = (kk <= qq) & (np.isin(kk, list(vs)) | np.isin(qq - kk, list(ss)))
  return m


@pytest.mark.parametrize("t,bq,bk", [(64, 16, 16), (100, 32, 16), (100, 16, 32)])
def test_vertical_slash_covers_required_keys_and_kernel_matches(t, bq, bk):
  rng = np.random.default_rng(t + bq + 2 * bk)
  b, h, kh, d = 1, 4, 1, 64
  vert = rng.integers(0, t, (b, h, 6)).astype(np.int32)
  vert[0, 0, :2] = [-1, 500]                          # padding / out of range: ignored
  vert[0, 1, :2] = vert[0, 1, 2]                      # duplicates
  slash = rng.integers(0, t, (b, h, 4)).astype(np.int32)
  slash[:, :, 0] = 0                                  # the diagonal, as MInference always keeps
  slash[0, 2, 1:] = -1
  nq, nk = -(-t // bq), -(-t // bk)
  f = jax.jit(vertical_slash_to_layout, static_argnums=(2, 3, 4, 5, 6))
  layout, cols = f(jnp.asarray(vert), jnp.asarray(slash), t, bq, bk, nk, 6)
  got = np.asarray(block_sparse_key_mask(layout, cols, t, t, True))
  req = _vs_required_mask(vert, slash, t)
  assert not (req & ~got).any(), "a required key is not attended"
  # over-coverage only by whole listed blocks: every extra key lies in a listed block that some
  # slash touches; columns are never inside a listed block; lists are duplicate-free
  cnt, idx = np.asarray(layout.count), np.asarray(layout.kv_block_idx)
  ccnt, cidx = np.asarray(cols.count), np.asarray(cols.index)
  for i in np.ndindex(b, h, nq):
    blocks = idx[i][:cnt[i]]
    assert len(set(blocks)) == len(blocks) and list(blocks) == sorted(blocks)
    q0, q1 = i[2] * bq, min((i[2] + 1) * bq, t) - 1
    for kb in blocks:
      assert any(max(q0 - o, 0) <= kb * bk + bk - 1 and q1 - o >= kb * bk
                 for o in slash[i[:2]] if 0 <= o < t), (i, kb)
    # one ascending list per head; the block takes every vertical up to its last row (the kernel
    # masks those inside a listed block)
    cs = cidx[i[0], i[1], 0][:ccnt[i]]
    assert list(cs) == sorted({c for c in vert[i[:2]] if 0 <= c <= q1})
  # (b) the kernel equals the reference on the layout's exact key set
  q, k, v = _inputs(rng, b, t, h, kh, d, jnp.float32)
  out, lse = block_sparse_attention(q, k, v, layout, scale=0.125, columns=cols, interpret=True,
                                    _poison=NAN)
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(got), scale=0.125)
  _compare(out, lse, ref, ref_lse, "float32")


def test_vertical_slash_truncation_keeps_nearest_blocks_and_lowest_columns():
  t, bq, bk = 64, 16, 16
  slash = jnp.asarray([[[0, 17, 40]]], jnp.int32)     # for the last query block: blocks 3, 1-2, 0-1
  vert = jnp.asarray([[[9, 2, 33, 5, 60]]], jnp.int32)
  layout, cols = vertical_slash_to_layout(vert, slash, t, bq, bk, 2, 2)
  cnt, idx = np.asarray(layout.count)[0, 0], np.asarray(layout.kv_block_idx)[0, 0]
  assert list(idx[3][:cnt[3]]) == [2, 3]              # highest blocks kept, block 0-1 dropped
  assert list(np.asarray(cols.index)[0, 0, 0]) == [2, 5]  # the lowest two of the sorted verticals
  assert int(cols.count[0, 0, 3]) == 2 and int(cols.count[0, 0, 0]) == 2


# -- dispatcher and bad inputs --------------------------------------------------------------------
def test_dispatch_falls_back_to_xla():
  q = jnp.ones((1, 16, 2, 32), jnp.float32)  # head_dim 32: not in the kernel
  layout = BlockSparse(jnp.ones((1, 2, 1), jnp.int32), jnp.zeros((1, 2, 1, 1), jnp.int32), 16, 16)
  out, _ = dispatch.call("block_sparse_attention", ("triton", "xla"), q, q, q, layout, scale=0.1,
                         interpret=True)
  assert out.shape == q.shape
  with pytest.raises(dispatch.DispatchError, match="triton: head_dim 32"):
    dispatch.call("block_sparse_attention", ("triton",), q, q, q, layout, scale=0.1, interpret=True)


def _good():
  q = jnp.ones((1, 40, 4, 64), jnp.float32)
  k = v = jnp.ones((1, 40, 2, 64), jnp.float32)
  layout = BlockSparse(jnp.ones((1, 4, 3), jnp.int32), jnp.zeros((1, 4, 3, 2), jnp.int32), 16, 16)
  cols = Columns(jnp.ones((1, 4, 3), jnp.int32), jnp.zeros((1, 4, 3, 5), jnp.int32))
  return q, k, v, layout, cols


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, L, C: (q, k[..., :32], v[..., :32], L, C), "head_dim mismatch"),
    (lambda q, k, v, L, C: (q.astype(jnp.bfloat16), k, v, L, C), "share a dtype"),
    (lambda q, k, v, L, C: (q[:, :, :3], k, v, L, C), "multiple of kv heads"),
    (lambda q, k, v, L, C: (q, k[:, :30], v[:, :30], L, C), "needs S == T"),
    (lambda q, k, v, L, C: (q, k, v, BlockSparse(L.count[:, :, :2], L.kv_block_idx, 16, 16), C),
     r"layout.count must have shape \(1, 4, 3\)"),
    (lambda q, k, v, L, C: (q, k, v, BlockSparse(L.count, L.kv_block_idx[:, :2], 16, 16), C),
     "layout.kv_block_idx must have shape"),
    (lambda q, k, v, L, C: (q, k, v, BlockSparse(L.count, L.kv_block_idx.astype(jnp.float32), 16, 16), C),
     "must be an integer array"),
    (lambda q, k, v, L, C: (q, k, v, L, Columns(C.count, C.index[0])), "columns.index must be"),
    (lambda q, k, v, L, C: (q, k, v, L, (C.count, C.index)), "columns must be a Columns"),
    (lambda q, k, v, L, C: (q, k, v, L, Columns(C.count[..., None], C.index)), "columns.count must have"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
  q, k, v, layout, cols = mutate(*_good())
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, layout, scale=0.1, columns=cols, interpret=True)


def test_layout_blocks_triton_lacks_fall_through():
  """A layout whose blocks are not powers of two (the Hopper kernel's 56-row split mode, or any
  other) is a valid call the Triton kernel does not serve: Unsupported, and the dispatcher's next
  implementation (here the reference) answers."""
  _, _, _, layout, cols = _good()
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((1, 40, 4, 64), (1, 40, 2, 64), (1, 40, 2, 64)))
  odd = BlockSparse(layout.count, jnp.asarray(rng.integers(0, 2, (1, 4, 3, 2)), jnp.int32), 16, 24)
  with pytest.raises(dispatch.Unsupported, match="block_k must be a power of two >= 16"):
    block_sparse_attention(q, k, v, odd, scale=0.1, columns=cols, interpret=True)
  out, lse = dispatch.call("block_sparse_attention", ("triton", "xla"), q, k, v, odd, scale=0.1, columns=cols,
                           interpret=True)
  ref, ref_lse = block_sparse_reference(q, k, v, odd, scale=0.1, columns=cols)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref_lse))


def test_bad_index_construction_inputs():
  with pytest.raises(ValueError, match="bool"):
    blocks_from_mask(jnp.ones((1, 1, 2, 2), jnp.int32), 2, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="integer"):
    vertical_slash_to_layout(jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2), jnp.int32), 64, 16, 16, 4, 4)
  with pytest.raises(ValueError, match="share"):
    vertical_slash_to_layout(jnp.ones((1, 2, 2), jnp.int32), jnp.ones((1, 1, 2), jnp.int32),
                             64, 16, 16, 4, 4)


# -- compiled on a GPU ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_gpu(case):
  _check_case(case, interpret=False, seed=zlib.crc32(case[0].encode()))


@pytest.mark.gpu
def test_vertical_slash_gpu_long():
  rng = np.random.default_rng(0)
  b, t, h, kh, d = 1, 1000, 8, 2, 128
  vert = jnp.asarray(rng.integers(0, t, (b, h, 64)), jnp.int32)
  slash = jnp.asarray(np.concatenate([np.zeros((b, h, 1)), rng.integers(0, t, (b, h, 31))], -1),
                      jnp.int32)
  layout, cols = vertical_slash_to_layout(vert, slash, t, 64, 64, 16, 64)
  q, k, v = _inputs(rng, b, t, h, kh, d, jnp.bfloat16)
  out, lse = block_sparse_attention(q, k, v, layout, scale=d ** -0.5, columns=cols, _poison=NAN)
  ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=d ** -0.5, columns=cols,
                                        out_dtype=jnp.float32)
  _compare(out, lse, ref, ref_lse, "bfloat16")
