"""Exact far slashes (pallas_kernels/diagonals.py): the split of isolated slashes against numpy, the
diagonal kernel (interpret mode, NaN-poisoned outputs) against its float32 oracle, and the exact
vertical-slash composition against a dense mask built in numpy from the pattern itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (assert_matches_oracle, diagonal_case, diagonal_oracle, numpy_exact_mask, numpy_split,
                     self_attention_qkv as _qkv)
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.diagonals import (diagonal_attention, diagonal_key_mask,
                                              exact_vertical_slash_attention, split_isolated_slashes)
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.reference import masked_attention_reference
from lcinfer.pallas_kernels.sparse_index import Columns
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, vertical_slash_to_ranges

NAN = float("nan")


@pytest.mark.parametrize("gap, max_diag", [(8, 64), (16, 3)])
def test_split_isolated_slashes_matches_numpy(gap, max_diag):
  rng = np.random.default_rng(gap)
  t = 300
  sl = rng.integers(-20, t + 20, (2, 3, 40)).astype(np.int32)
  sl[0, 0, :4] = [50, 50, 51, 200]          # a repeat and a neighbour are not isolated
  rest, offs = jax.jit(split_isolated_slashes, static_argnums=(1, 2, 3))(jnp.asarray(sl), t, gap, max_diag)
  rest, offs = np.asarray(rest), np.asarray(offs)
  assert offs.shape == (2, 3, max_diag)
  for b in range(2):
    for h in range(3):
      want_rest, want_taken = numpy_split(sl[b, h], t, gap, max_diag)
      got_rest = np.sort(rest[b, h][rest[b, h] >= 0])
      np.testing.assert_array_equal(got_rest, want_rest)
      np.testing.assert_array_equal(offs[b, h], np.pad(want_taken, (0, max_diag - len(want_taken)),
                                                       constant_values=-1))


def test_diagonal_key_mask_is_the_listed_diagonals():
  offs = np.array([[[0, 3, 3, -1, 9, 40]]], np.int32)     # repeat, padding, beyond the sequence
  got = np.asarray(diagonal_key_mask(jnp.asarray(offs), 12, 12))[0, 0]
  i, k = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
  np.testing.assert_array_equal(got, np.isin(i - k, [0, 3, 9]))


def _exclusions(rng, b, h, t, bq, nv, ns):
  vert = jnp.asarray(rng.integers(0, t, (b, h, nv)), jnp.int32)
  sl = jnp.asarray(rng.integers(0, t, (b, h, ns)), jnp.int32)
  return vertical_slash_to_ranges(vert, sl, t, bq, 16, 4 * ns, nv + 8)


# programs: a persistent launch (items not a multiple of it: programs with one item less); 3 and 4
# diagonals a step walk the offsets descending (a padded last step, and a persistent launch)
@pytest.mark.parametrize("t,h,kh,d,bq,dtype,excl,per_step,programs", [
    (100, 4, 1, 64, 16, "float32", "both", 1, None),    # GQA 4, odd length, ranges and columns excluded
    (77, 2, 2, 128, 32, "float32", None, 3, 5),         # 3 diagonals a step (9 offsets: whole steps)
    (90, 8, 1, 64, 16, "bfloat16", "both", 2, 7),       # GQA 8; 96 items over 7 programs
    (64, 4, 4, 128, 64, "bfloat16", None, 4, None),     # 9 offsets in steps of 4: a padded last step
    (70, 2, 1, 64, 16, "float32", "columns", 1, 3),     # columns alone (per-block prefixes of one list)
])
def test_diagonal_kernel_matches_oracle(t, h, kh, d, bq, dtype, excl, per_step, programs):
  rng = np.random.default_rng(t + d)
  q, k, v = _qkv(rng, 2, t, h, kh, d, dtype)
  offs, ranges, cols, _ = diagonal_case(rng, q, bq, excl)
  kw = dict(scale=d ** -0.5, exclude=ranges, exclude_columns=cols, block_q=bq)
  out, lse = diagonal_attention(q, k, v, offs, diagonals_per_step=per_step,
                                heads_first=per_step > 1 and programs is None, programs=programs, interpret=True,
                                descending=per_step in (3, 4), _poison=NAN, **kw)
  ref, ref_lse = diagonal_oracle(q, k, v, offs, **kw)
  empty = assert_matches_oracle("diagonal", out, lse, ref, ref_lse, dtype)
  assert empty.any() and not empty.all()


@pytest.mark.parametrize("programs", [None, 3])
def test_merge_in_the_epilogue_equals_merge_attention(programs):
  """merge_with: the other call's (out, lse), rows of it empty (-inf) or not, merged in the kernel
  (the grid launch and a persistent one)."""
  from lcinfer.attention.base import merge_attention
  rng = np.random.default_rng(4)
  b, t, h, kh, d, bq = 1, 70, 4, 2, 64, 16
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  offs = jnp.asarray(rng.integers(0, t, (b, h, 5)), jnp.int32)
  other = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32),
           jnp.asarray(np.where(rng.random((b, t, h)) < 0.3, -np.inf, rng.standard_normal((b, t, h))), jnp.float32))
  out, lse = diagonal_attention(q, k, v, offs, scale=0.125, merge_with=other, block_q=bq, programs=programs,
                                interpret=True, _poison=NAN)
  alone = diagonal_oracle(q, k, v, offs, scale=0.125, block_q=bq)
  ref, ref_lse = merge_attention([other, alone])
  empty = assert_matches_oracle("merged", out, lse, ref, ref_lse, "float32")
  assert empty.any() and np.isneginf(np.asarray(alone[1])).sum() > empty.sum()   # rows only the other saw


def test_exclusion_removes_exactly_the_listed_keys():
  """A diagonal key inside an excluded range or column of its block is dropped; one in another
  block's range is kept: compare against the oracle on hand-made lists."""
  rng = np.random.default_rng(1)
  t, bq = 64, 16
  q, k, v = _qkv(rng, 1, t, 1, 1, 64, "float32")
  offs = jnp.asarray([[[2, 20]]], jnp.int32)
  nq = t // bq
  start = np.zeros((1, 1, nq, 1), np.int32)
  start[0, 0, 1, 0] = 10                                   # block 1 (rows 16-31) excludes keys 10-13
  ranges = KeyRanges(jnp.asarray([[[0, 1, 0, 0]]], jnp.int32), jnp.asarray(start), jnp.asarray(start + 4), bq, 16)
  cols = Columns(jnp.asarray([[[0, 0, 1, 1]]], jnp.int32), jnp.asarray([[[[40]]]], jnp.int32))  # blocks 2, 3
  out, lse = diagonal_attention(q, k, v, offs, scale=0.125, exclude=ranges, exclude_columns=cols,
                                block_q=bq, interpret=True)
  mask = np.asarray(diagonal_key_mask(offs, t, t))[0, 0].copy()
  mask[16:32, 10:14] = False
  mask[32:, 40] = False
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(mask)[None, None], scale=0.125)
  assert mask[12, 10] and mask[22, 20] and not mask[30, 10] and not mask[42, 40] and not mask[60, 40]
  assert_matches_oracle("exclusion", out, lse, ref, ref_lse, "float32")


# 24: ranges of other heights than 16; programs: the diagonals as a persistent launch
@pytest.mark.parametrize("impl, bq, programs", [("triton", 16, None), ("xla", 24, 5)])
def test_exact_vertical_slash_matches_a_mask_built_from_the_pattern(impl, bq, programs):
  rng = np.random.default_rng(7)
  b, t, h, kh, d = 1, 160, 4, 2, 64
  vert = rng.integers(0, t, (b, h, 5)).astype(np.int32)
  sl = np.concatenate([np.broadcast_to(np.arange(6), (b, h, 6)),          # a near band (a run)
                       rng.integers(20, t, (b, h, 5))], axis=-1).astype(np.int32)
  sl[0, 0, -2:] = [100, 104]                                              # close pair: stays ranges
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  call = functools.partial(exact_vertical_slash_attention, scale=d ** -0.5, block_q=bq, block_k=16, max_ranges=64,
                           max_cols=16, diagonal_block_q=16, implementation=impl, diagonal_programs=programs,
                           interpret=True)
  out, lse = call(q, k, v, jnp.asarray(vert), jnp.asarray(sl))
  mask = numpy_exact_mask(vert, sl, t, bq, bq, 64)
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(mask), scale=d ** -0.5)
  assert_matches_oracle(f"exact vs ({impl})", out, lse, ref, ref_lse, "float32")
  _, taken = numpy_split(sl[0, 1], t, bq, 64)
  assert taken, "the pattern must have isolated slashes for this test to mean anything"


def test_exact_mode_with_the_hopper_kernel_in_interpret_mode(monkeypatch):
  """The exact mode's band and columns through the Hopper kernel itself (Mosaic GPU's interpret mode,
  `flash_mgpu._run`; the dispatcher would give interpret calls to the Triton kernel) at 128x128, the
  benchmark's layout for (3500, 100), against a mask built in numpy from the pattern."""
  from lcinfer.pallas_kernels import flash_mgpu
  runs = []

  def hopper_interpreted(q, k, v, layout, *, scale, causal=True, columns=None, **_):
    runs.append((layout.block_q, layout.block_k))
    return flash_mgpu._run(q, k, v, layout, columns, scale=float(scale), causal=causal, block_k=layout.block_k,
                           stages=2, heads_fastest=True, interpret=True)
  monkeypatch.setitem(dispatch._IMPLS["block_sparse_attention"], "mosaic_gpu", hopper_interpreted)
  rng = np.random.default_rng(12)
  b, t, h, kh, d = 1, 384, 2, 1, 64
  vert = rng.integers(0, t, (b, h, 20)).astype(np.int32)
  far = [[170, 320, 35, 20], [200, 340, 350, 45]]   # isolated: 170, 320 / 200; the rest stay ranges
  sl = np.concatenate([np.broadcast_to(np.arange(30), (b, h, 30)), np.asarray([far])], axis=-1).astype(np.int32)
  q, k, v = _qkv(rng, b, t, h, kh, d, "bfloat16")
  out, lse = exact_vertical_slash_attention(q, k, v, jnp.asarray(vert), jnp.asarray(sl), scale=d ** -0.5,
                                            block_q=128, block_k=128, max_ranges=64, max_cols=32,
                                            implementation=("mosaic_gpu",))
  assert runs == [(128, 128)]
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(numpy_exact_mask(vert, sl, t, 128, 128, 64)),
                                            scale=d ** -0.5)
  assert_matches_oracle("exact vs, Hopper kernel interpreted", out, lse, ref, ref_lse, "bfloat16")
  assert [sorted(numpy_split(sl[0, i], t, 128, 64)[1]) for i in range(h)] == [[170, 320], [200]]


def test_exact_mode_default_blocks_follow_the_kernel_that_serves(monkeypatch):
  """Blocks default to 128 x 64 where the Hopper kernel would run first (the H200 benchmark's fastest
  layout), else 64 x 64 (the Triton kernel's): checked on the layout the block-sparse call gets."""
  import lcinfer.pallas_kernels.diagonals as dg
  seen = []
  monkeypatch.setitem(dispatch._IMPLS["block_sparse_attention"], "xla",
                      lambda q, k, v, layout, **kw: seen.append((layout.block_q, layout.block_k)) or
                      (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf)))
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 1, 256, 2, 1, 64, "float32")
  vert, sl = jnp.zeros((1, 2, 4), jnp.int32), jnp.asarray([[[0, 1, 200, 90]] * 2], jnp.int32)
  call = functools.partial(exact_vertical_slash_attention, q, k, v, vert, sl, scale=0.1, max_ranges=16,
                           max_cols=8, implementation="xla")
  call()
  monkeypatch.setattr(dg, "hopper_device", lambda: "H200")
  call()                                               # "xla" first: not the Hopper kernel's call
  assert dg._hopper_serves(None, False) and dg._hopper_serves(("mosaic_gpu", "triton"), False)
  assert not dg._hopper_serves("triton", False) and not dg._hopper_serves(None, True)
  monkeypatch.setattr(dg, "_hopper_serves", lambda impl, interpret: True)
  call()
  assert seen == [(64, 64), (64, 64), (128, 64)]


def test_bad_diagonal_input_raises():
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 1, 32, 2, 1, 64, "float32")
  offs = jnp.zeros((1, 2, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"offsets must be \[B, H, F\]"):
    diagonal_attention(q, k, v, jnp.zeros((1, 3, 3), jnp.int32), scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="integers"):
    diagonal_attention(q, k, v, offs.astype(jnp.float32), scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="block_q"):
    diagonal_attention(q, k, v, offs, scale=1.0, block_q=24, interpret=True)
  with pytest.raises(ValueError, match="diagonals_per_step"):
    diagonal_attention(q, k, v, offs, scale=1.0, diagonals_per_step=0, interpret=True)
  with pytest.raises(ValueError, match="programs"):
    diagonal_attention(q, k, v, offs, scale=1.0, programs=0, interpret=True)
  with pytest.raises(ValueError, match="heads_first"):
    diagonal_attention(q, k, v, offs, scale=1.0, programs=4, heads_first=True, interpret=True)
  ranges = KeyRanges(jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2, 1), jnp.int32),
                     jnp.zeros((1, 2, 2, 1), jnp.int32), 16, 16)
  with pytest.raises(ValueError, match="must equal block_q"):
    diagonal_attention(q, k, v, offs, scale=1.0, exclude=ranges, block_q=32, interpret=True)
  with pytest.raises(ValueError, match="shared list"):
    diagonal_attention(q, k, v, offs, scale=1.0, exclude_columns=Columns(
        jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2, 4), jnp.int32)), interpret=True, block_q=16)
  with pytest.raises(ValueError, match="merge_with"):
    diagonal_attention(q, k, v, offs, scale=1.0, merge_with=(q, jnp.zeros((1, 32, 1))), interpret=True)
  with pytest.raises(ValueError, match="S == T"):
    diagonal_attention(q, k[:, :16], v[:, :16], offs, scale=1.0, interpret=True)
  for vert, sl, match in ((offs, offs.astype(jnp.float32), "integer"), (offs, offs[0], "integer"),
                          (jnp.zeros((1, 3, 2), jnp.int32), jnp.zeros((1, 3, 2), jnp.int32), "q's B, H")):
    with pytest.raises(ValueError, match=match):
      exact_vertical_slash_attention(q, k, v, vert, sl, scale=1.0, max_ranges=4, max_cols=4, interpret=True)
  with pytest.raises(ValueError, match="integer"):
    split_isolated_slashes(offs.astype(jnp.float32), 32, 16)
  with pytest.raises(ValueError, match="both block_q and block_k"):
    exact_vertical_slash_attention(q, k, v, offs, offs, scale=1.0, block_q=64, max_ranges=4, max_cols=4,
                                   interpret=True)
  with pytest.raises(dispatch.Unsupported, match="head_dim"):
    q2, k2, v2 = _qkv(rng, 1, 32, 2, 1, 32, "float32")
    diagonal_attention(q2, k2, v2, offs, scale=1.0, interpret=True)


@pytest.mark.parametrize("per_step, excl, programs", [(1, False, None), (4, True, None), (2, True, 132)])
def test_diagonal_kernel_lowers_to_triton_for_hopper(monkeypatch, per_step, excl, programs):
  """The whole kernel body goes through Pallas' Triton lowering on CPU (the GPU info an H200's), so
  an op Triton cannot take fails here, not first on the device."""
  from jax._src.pallas.triton import gpu_info      # private: the lowering's only GPU query
  from lcinfer.pallas_kernels.diagonals import _diagonal
  monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
  rng = np.random.default_rng(0)
  b, t, h, kh, d, bq = 1, 512, 4, 2, 128, 64
  q, k, v = _qkv(rng, b, t, h, kh, d, "bfloat16")
  offs = jnp.zeros((b, h, 50), jnp.int32)
  ranges, cols = _exclusions(rng, b, h, t, bq, 20, 10) if excl else (None, None)
  main = (q, jnp.zeros((b, t, h), jnp.float32)) if excl else None
  fn = lambda q, k, v, o: _diagonal(q, k, v, o, ranges, cols, main, scale=0.1, block_q=bq, per_step=per_step,  # noqa: E731
                                    num_warps=4, num_stages=2, interpret=False, poison=None,
                                    heads_first=excl and programs is None, programs=programs)
  text = jax.jit(fn).trace(q, k, v, offs).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("@__gpu$xla.gpu.triton") == 1


# -- compiled on a GPU ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, kh, per_step, programs", [("bfloat16", 2, 1, None), ("float32", 8, 2, None),
                                                      ("bfloat16", 8, 4, None), ("bfloat16", 2, 2, 13)])
def test_diagonal_kernel_gpu(dtype, kh, per_step, programs):
  rng = np.random.default_rng(11)
  b, t, h, d, bq = 1, 1000, 8, 128, 64
  q, k, v = _qkv(rng, b, t, h, kh, d, dtype)
  offs = jnp.asarray(rng.integers(-4, t, (b, h, 50)), jnp.int32)
  ranges, cols = _exclusions(rng, b, h, t, bq, 40, 30)
  kw = dict(scale=d ** -0.5, exclude=ranges, exclude_columns=cols, block_q=bq)
  out, lse = diagonal_attention(q, k, v, offs, diagonals_per_step=per_step, heads_first=per_step > 1 and programs is None,
                                programs=programs, descending=per_step == 4 or programs is not None, _poison=NAN, **kw)
  ref, ref_lse = diagonal_oracle(q, k, v, offs, **kw)
  assert_matches_oracle("diagonal gpu", out, lse, ref, ref_lse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl, bq, bk, programs", [
    ("triton", 64, 64, None), ("mosaic_gpu", 128, 64, None), ("mosaic_gpu", 56, 64, None),
    ("mosaic_gpu", 128, 64, 16), ("mosaic_gpu", 128, 128, None)])   # 128x128: narrow steps for ranges
def test_exact_vertical_slash_gpu(impl, bq, bk, programs):
  if impl == "mosaic_gpu" and hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(12)
  b, t, h, kh, d = 1, 1024, 4, 2, 128
  vert = rng.integers(0, t, (b, h, 20)).astype(np.int32)
  sl = np.concatenate([np.broadcast_to(np.arange(40), (b, h, 40)), rng.integers(40, t, (b, h, 12))],
                      axis=-1).astype(np.int32)
  q, k, v = _qkv(rng, b, t, h, kh, d, "bfloat16")
  out, lse = exact_vertical_slash_attention(q, k, v, jnp.asarray(vert), jnp.asarray(sl), scale=d ** -0.5,
                                            block_q=bq, block_k=bk, max_ranges=64, max_cols=32,
                                            diagonal_programs=programs, implementation=impl)
  mask = numpy_exact_mask(vert, sl, t, bq, bq, 64)
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(mask), scale=d ** -0.5)
  assert_matches_oracle(f"exact vs gpu ({impl})", out, lse, ref, ref_lse, "bfloat16")
