"""The TPU diagonal kernel (pallas_kernels/tpu_diagonals.py) in TPU interpret mode, against the
dense-mask oracle: GQA, odd lengths, excluded columns, merge_with, outputs poisoned before the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle, diagonal_case, diagonal_oracle, self_attention_qkv as _qkv
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.tpu_diagonals import tpu_diagonal_attention
from lcinfer.pallas_kernels.vertical_slash import KeyRanges

NAN = float("nan")


@pytest.mark.parametrize("t,h,kh,d,bq,dtype,cols,merge", [
    (100, 4, 2, 64, 16, "float32", True, False),      # GQA 2, odd length, excluded columns
    (77, 2, 2, 128, 32, "float32", False, True),      # merged with another call's result
    (90, 8, 1, 64, 16, "bfloat16", True, True),       # GQA 8
])
def test_tpu_diagonals_match_oracle(t, h, kh, d, bq, dtype, cols, merge):
  rng = np.random.default_rng(t + h)
  q, k, v = _qkv(rng, 2, t, h, kh, d, dtype)
  offs, _, excl, other = diagonal_case(rng, q, bq, "columns" if cols else None, merge)
  kw = dict(scale=d ** -0.5, exclude_columns=excl, block_q=bq)
  out, lse = tpu_diagonal_attention(q, k, v, offs, merge_with=other, interpret=True, _poison=NAN, **kw)
  ref, ref_lse = diagonal_oracle(q, k, v, offs, other, **kw)
  assert out.dtype == q.dtype
  empty = assert_matches_oracle("tpu diagonals", out, lse, ref, ref_lse, dtype)
  assert empty.any() and not empty.all()


def test_tpu_diagonals_pass_what_they_cannot_serve():
  """Excluded ranges, blocks a TPU cannot tile, and a CPU without interpret mode raise Unsupported,
  so the dispatcher takes the next implementation."""
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng, 1, 64, 2, 1, 64, "float32")
  offs = jnp.asarray([[[3, 9], [0, 40]]], jnp.int32)
  ranges = KeyRanges(jnp.zeros((1, 2, 4), jnp.int32), jnp.zeros((1, 2, 4, 1), jnp.int32),
                     jnp.zeros((1, 2, 4, 1), jnp.int32), 16, 16)
  with pytest.raises(dispatch.Unsupported, match="ranges"):
    tpu_diagonal_attention(q, k, v, offs, scale=0.1, exclude=ranges, block_q=16, interpret=True)
  with pytest.raises(dispatch.Unsupported, match="power of two"):
    tpu_diagonal_attention(q, k, v, offs, scale=0.1, block_q=24, interpret=True)
  if jax.default_backend() == "cpu":
    with pytest.raises(dispatch.Unsupported, match="needs a TPU"):
      tpu_diagonal_attention(q, k, v, offs, scale=0.1, block_q=16)
  out, lse = dispatch.call("diagonal_attention", ("tpu", "xla"), q, k, v, offs, scale=0.1, exclude=ranges,
                           block_q=16, interpret=True)   # falls through to the XLA scan
  ref, ref_lse = diagonal_oracle(q, k, v, offs, scale=0.1, exclude=ranges, block_q=16)
  assert_matches_oracle("fall-through", out, lse, ref, ref_lse, "float32")


def test_exact_mode_takes_128_row_diagonal_blocks_on_a_tpu(monkeypatch):
  """The exact mode's diagonal_block_q defaults to 128 on a TPU (the kernel's tiles), 64 elsewhere;
  the key set is the same either way (numpy, from the pattern)."""
  from helpers import numpy_exact_mask
  from lcinfer.pallas_kernels import diagonals
  from lcinfer.pallas_kernels.reference import masked_attention_reference
  seen = []
  call = dispatch.call

  def spy(op, impls, *args, **kw):
    if op == "diagonal_attention":
      seen.append(kw["block_q"])
    return call(op, impls, *args, **kw)
  monkeypatch.setattr(dispatch, "call", spy)
  rng = np.random.default_rng(5)
  b, t, h, kh, d, bq = 1, 160, 2, 1, 64, 16
  vert = rng.integers(0, t, (b, h, 5)).astype(np.int32)
  sl = np.concatenate([np.broadcast_to(np.arange(4), (b, h, 4)), rng.integers(20, t, (b, h, 4))], -1).astype(np.int32)
  q, k, v = _qkv(rng, b, t, h, kh, d, "float32")
  mask = numpy_exact_mask(vert, sl, t, bq, bq, 64)
  ref, ref_lse = masked_attention_reference(q, k, v, jnp.asarray(mask), scale=d ** -0.5)
  for on_tpu, want in ((False, 64), (True, 128)):
    monkeypatch.setattr(diagonals, "_on_tpu", lambda on_tpu=on_tpu: on_tpu)
    out, lse = diagonals.exact_vertical_slash_attention(
        q, k, v, jnp.asarray(vert), jnp.asarray(sl), scale=d ** -0.5, block_q=bq, block_k=16, max_ranges=64,
        max_cols=16, implementation="xla")
    assert seen[-1] == want
    assert_matches_oracle(f"exact mode, diagonal blocks of {want}", out, lse, ref, ref_lse, "float32")
