"""The plain-XLA diagonal attention (pallas_kernels/diagonals_xla.py): the dispatcher's fallback where
no diagonal kernel runs (TPU, CPU without interpret mode), against the dense-mask oracle and the
exact mode's key set built in numpy; and its memory, linear in the sequence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle, numpy_exact_mask, self_attention_qkv as _qkv
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.diagonals import diagonal_reference, exact_vertical_slash_attention
from lcinfer.pallas_kernels.diagonals_xla import diagonal_attention_xla
from lcinfer.pallas_kernels.reference import masked_attention_reference
from lcinfer.pallas_kernels.sparse_index import Columns
from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges

_reference = jax.jit(diagonal_reference, static_argnames=("scale", "block_q"))


@pytest.mark.parametrize("t,h,kh,d,bq,dtype,excl,merge", [
    (100, 4, 2, 64, 16, "float32", "both", False),     # GQA 2, odd length, ranges and columns excluded
    (77, 2, 2, 128, 32, "float32", None, True),        # no GQA, merged with another call's result
    (90, 8, 1, 64, 16, "bfloat16", "both", True),      # GQA 8
    (70, 2, 1, 64, 16, "float32", "columns", False),   # columns alone: an unsorted list, per-block prefixes
])
def test_xla_diagonals_match_oracle(t, h, kh, d, bq, dtype, excl, merge):
  from lcinfer.attention.base import merge_attention
  rng = np.random.default_rng(t + h)
  b = 2
  q, k, v = _qkv(rng, b, t, h, kh, d, dtype)
  offs = rng.integers(-4, t + 4, (b, h, 9)).astype(np.int32)
  offs[0, 0] = -1                                         # a head with no diagonal: rows see nothing
  offs[1, 0, :3] = [5, 5, 0]                              # a repeat counts once; the diagonal itself
  ranges = cols = None
  if excl == "both":
    vert = jnp.asarray(rng.integers(0, t, (b, h, 6)), jnp.int32)
    sl = jnp.asarray(rng.integers(0, t, (b, h, 5)), jnp.int32)
    ranges, cols = vertical_slash_to_ranges(vert, sl, t, bq, 16, 20, 14)
    past = jnp.arange(ranges.start.shape[-1]) >= ranges.count[..., None]   # garbage past each count
    junk = jnp.asarray(rng.integers(0, t, ranges.start.shape), jnp.int32)
    ranges = dataclasses.replace(ranges, start=jnp.where(past, junk, ranges.start),
                                 end=jnp.where(past, junk + 8, ranges.end))
  if excl == "columns":
    nq = -(-t // bq)
    cols = Columns(jnp.asarray(rng.integers(0, 13, (b, h, nq)), jnp.int32),
                   jnp.asarray(rng.integers(-2, t + 2, (b, h, 1, 12)), jnp.int32))
  other = None
  if merge:
    other = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32).astype(q.dtype),
             jnp.asarray(np.where(rng.random((b, t, h)) < 0.3, -np.inf, rng.standard_normal((b, t, h))), jnp.float32))
  kw = dict(scale=d ** -0.5, exclude=ranges, exclude_columns=cols, block_q=bq)
  out, lse = diagonal_attention_xla(q, k, v, jnp.asarray(offs), merge_with=other, diagonals_per_step=2, **kw)
  ref, ref_lse = _reference(q, k, v, jnp.asarray(offs), **kw)
  if merge:
    ref, ref_lse = merge_attention([(other[0].astype(jnp.float32), other[1]), (ref, ref_lse)])
  assert out.dtype == q.dtype
  empty = assert_matches_oracle("xla diagonals", out, lse, ref, ref_lse, dtype)
  assert empty.any() and not empty.all()


def test_xla_diagonals_take_memory_linear_in_the_sequence():
  """At T = 8192 (H = 2) the oracle's masks alone are 2 x 8192^2 bytes (134 MB); the scan's working
  set stays within a few arrays of [B, T, H, D] float32 (4 MB each: the accumulator, K and V padded
  with T rows in front)."""
  rng = np.random.default_rng(0)
  b, t, h, kh, d = 1, 8192, 2, 1, 64
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  offs = jnp.asarray(rng.integers(0, t, (b, h, 16)), jnp.int32)
  cols = Columns(jnp.full((b, h, t // 64), 8, jnp.int32), jnp.asarray(rng.integers(0, t, (b, h, 1, 8)), jnp.int32))
  compiled = jax.jit(lambda q, k, v, o: diagonal_attention_xla(q, k, v, o, scale=0.125, exclude_columns=cols)).lower(
      q, k, v, offs).compile()
  acc_bytes = b * t * h * d * 4
  assert compiled.memory_analysis().temp_size_in_bytes < 8 * acc_bytes < b * h * t * t / 2


def test_exact_mode_falls_back_to_xla_where_no_kernel_runs():
  """On a CPU without interpret mode the Triton diagonal kernel raises Unsupported and the
  dispatcher takes the XLA scan: the exact mode's key set from the pattern, in numpy."""
  rng = np.random.default_rng(3)
  b, t, h, kh, d, bq = 1, 160, 4, 2, 64, 16
  vert = rng.integers(0, t, (b, h, 5)).astype(np.int32)
  sl = np.concatenate([np.broadcast_to(np.arange(6), (b, h, 6)), rng.integers(20, t, (b, h, 5))],
                      axis=-1).astype(np.int32)
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  if jax.default_backend() == "cpu":   # no interpret: the kernel cannot run here (a GPU runs it instead)
    with pytest.raises(dispatch.DispatchError, match="triton"):
      dispatch.call("diagonal_attention", ("triton",), q, k, v, jnp.asarray(sl), scale=0.125)
  out, lse = exact_vertical_slash_attention(q, k, v, jnp.asarray(vert), jnp.asarray(sl), scale=d ** -0.5,
                                            block_q=bq, block_k=16, max_ranges=64, max_cols=16,
                                            diagonal_block_q=bq, implementation="xla")
  mask = numpy_exact_mask(vert, sl, t, bq, bq, 64)
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(mask), scale=d ** -0.5)
  assert_matches_oracle("exact mode, xla fallback", out, lse, ref, ref_lse, "float32")
