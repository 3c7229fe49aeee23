"""The plain-XLA diagonal attention (pallas_kernels/diagonals_xla.py): the dispatcher's fallback where
no diagonal kernel runs (TPU, CPU without interpret mode), against the dense-mask oracle and the
exact mode's key set built in numpy; and its memory, linear in the sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle, diagonal_case, diagonal_oracle, numpy_exact_mask, self_attention_qkv as _qkv
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.diagonals import exact_vertical_slash_attention
from lcinfer.pallas_kernels.diagonals_xla import diagonal_attention_xla
from lcinfer.pallas_kernels.reference import masked_attention_reference
from lcinfer.pallas_kernels.sparse_index import Columns

@pytest.mark.parametrize("t,h,kh,d,bq,dtype,excl,merge", [
    (100, 4, 2, 64, 16, "float32", "both", False),     # GQA 2, odd length, ranges and columns excluded
    (77, 2, 2, 128, 32, "float32", None, True),        # no GQA, merged with another call's result
    (90, 8, 1, 64, 16, "bfloat16", "both", True),      # GQA 8
    (70, 2, 1, 64, 16, "float32", "columns", False),   # columns alone: an unsorted list, per-block prefixes
])
def test_xla_diagonals_match_oracle(t, h, kh, d, bq, dtype, excl, merge):
  rng = np.random.default_rng(t + h)
  q, k, v = _qkv(rng, 2, t, h, kh, d, dtype)
  offs, ranges, cols, other = diagonal_case(rng, q, bq, excl, merge)
  kw = dict(scale=d ** -0.5, exclude=ranges, exclude_columns=cols, block_q=bq)
  out, lse = diagonal_attention_xla(q, k, v, offs, merge_with=other, diagonals_per_step=2, **kw)
  ref, ref_lse = diagonal_oracle(q, k, v, offs, other, **kw)
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
