"""The Mosaic TPU block-sparse / flash kernels (pallas_kernels/tpu_block_sparse.py) in TPU interpret
mode on CPU, against the float32 oracles, outputs NaN-poisoned before each run."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.reference import attention_reference, block_sparse_reference
from lcinfer.pallas_kernels.sparse_index import BlockSparse, Columns, blocks_from_mask
from lcinfer.pallas_kernels.tpu_block_sparse import tpu_block_sparse_attention, tpu_flash_attention

NAN = float("nan")

# (name, b, t, h, kh, d, dtype, block_q, block_k, keep probability)
SPARSE = [
    ("g1_odd", 1, 100, 2, 2, 64, "float32", 16, 32, 0.5),
    ("g4_empty_rows", 2, 64, 4, 1, 128, "float32", 16, 16, 0.15),
    ("g8_bf16", 1, 77, 8, 1, 64, "bfloat16", 32, 16, 0.6),
]


def _qkv(seed, b, t, h, kh, d, dtype):
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(dtype)
  return (jnp.asarray(rng.standard_normal((b, t, h, d)), dt), jnp.asarray(rng.standard_normal((b, t, kh, d)), dt),
          jnp.asarray(rng.standard_normal((b, t, kh, d)), dt), rng)


@pytest.mark.parametrize("case", SPARSE, ids=[c[0] for c in SPARSE])
def test_block_sparse_matches_oracle(case):
  name, b, t, h, kh, d, dtype, bq, bk, keep = case
  q, k, v, rng = _qkv(zlib.crc32(name.encode()), b, t, h, kh, d, dtype)
  nq, nk = -(-t // bq), -(-t // bk)
  layout = blocks_from_mask(jnp.asarray(rng.random((b, h, nq, nk)) < keep), nk, block_q=bq, block_k=bk)
  out, lse = tpu_block_sparse_attention(q, k, v, layout, scale=d ** -0.5, interpret=True, _poison=NAN)
  ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=d ** -0.5, out_dtype=jnp.float32)
  empty = assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)
  if name == "g4_empty_rows":
    assert empty.any() and (~empty).any()


@pytest.mark.parametrize("bq,bk,dtype", [(16, 16, "float32"), (32, 16, "bfloat16")])
def test_unaligned_key_ranges_match_oracle(bq, bk, dtype):
  """KeyRanges at any offset (overlapping, too long, out of range, past the count) go through
  element-offset K/V block specs; and MInference-style ranges from vertical_slash_to_ranges."""
  from lcinfer.pallas_kernels.vertical_slash import KeyRanges, vertical_slash_to_ranges
  q, k, v, rng = _qkv(bq + bk, 1, 90, 4, 2, 64, dtype)
  nq = -(-90 // bq)
  start = rng.integers(-bk, 90 + bk, (1, 4, nq, 5)).astype(np.int32)
  ranges = KeyRanges(jnp.asarray(rng.integers(0, 6, (1, 4, nq)), jnp.int32), jnp.asarray(start),
                     jnp.asarray(start + rng.integers(-2, 2 * bk, start.shape).astype(np.int32)), bq, bk)
  slash = jnp.asarray(np.concatenate([np.zeros((1, 4, 1)), rng.integers(0, 90, (1, 4, 5))], -1), jnp.int32)
  vs_ranges, _ = vertical_slash_to_ranges(jnp.zeros((1, 4, 1), jnp.int32), slash, 90, bq, bk, 8, 1)
  for name, r in (("random ranges", ranges), ("vertical-slash ranges", vs_ranges)):
    out, lse = tpu_block_sparse_attention(q, k, v, r, scale=0.125, interpret=True, _poison=NAN)
    ref, ref_lse = block_sparse_reference(q, k, v, r, scale=0.125, out_dtype=jnp.float32)
    assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("shared,causal,dtype", [(True, True, "float32"), (False, False, "bfloat16")])
def test_gathered_columns_match_oracle(shared, causal, dtype):
  """Block lists plus gathered columns (the vertical part): a list per head (a prefix per query
  block) or per query block, with out-of-range entries, repeats, columns inside listed blocks and
  above the diagonal, GQA 2, a short last block."""
  q, k, v, rng = _qkv(int(shared) + 2 * int(causal), 1, 100, 4, 2, 64, dtype)
  bq = bk = 16
  nq = nk = 7
  layout = blocks_from_mask(jnp.asarray(rng.random((1, 4, nq, nk)) < 0.3), nk, block_q=bq, block_k=bk)
  idx = rng.integers(-3, 105, (1, 4, 1 if shared else nq, 21)).astype(np.int32)
  cols = Columns(jnp.asarray(rng.integers(0, 24, (1, 4, nq)), jnp.int32), jnp.asarray(idx))
  out, lse = tpu_block_sparse_attention(q, k, v, layout, scale=0.125, causal=causal, columns=cols,
                                        interpret=True, _poison=NAN)
  ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=0.125, causal=causal, columns=cols,
                                        out_dtype=jnp.float32)
  assert_matches_oracle(f"columns shared={shared}", out, lse, ref, ref_lse, dtype)


def test_vertical_slash_index_runs_whole_on_tpu_kernel():
  """MInference's vertical-slash index (vertical_slash_to_ranges: key ranges + one column list per
  head) through the dispatcher's "tpu" entry, against the oracle of the same index."""
  from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges
  q, k, v, rng = _qkv(11, 1, 120, 2, 1, 64, "float32")
  vertical = jnp.asarray(np.concatenate([np.zeros((1, 2, 1)), rng.integers(1, 120, (1, 2, 9))], -1), jnp.int32)
  slash = jnp.asarray(np.concatenate([np.arange(3)[None, None].repeat(2, 1), rng.integers(3, 120, (1, 2, 4))],
                                     -1), jnp.int32)
  ranges, cols = vertical_slash_to_ranges(vertical, slash, 120, 16, 16, 12, 10)
  out, lse = dispatch.call("block_sparse_attention", ("tpu",), q, k, v, ranges, scale=0.125, columns=cols,
                           interpret=True)
  ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=0.125, columns=cols, out_dtype=jnp.float32)
  assert_matches_oracle("vertical-slash", out, lse, ref, ref_lse, "float32")


def test_garbage_entries_follow_union_semantics():
  """Duplicates, out-of-range and beyond-count entries: the canonicalized lists the kernel reads."""
  q, k, v, _ = _qkv(3, 1, 48, 2, 1, 64, "float32")
  idx = jnp.asarray([[[[0, 0, 7, -1], [1, 0, 1, 2], [2, 9, 0, 1]]] * 2])   # nq = 3 (bq 16), nk = 3
  layout = BlockSparse(jnp.asarray([[[2, 3, 4]] * 2], jnp.int32), idx.astype(jnp.int32), 16, 16)
  out, lse = tpu_block_sparse_attention(q, k, v, layout, scale=0.125, interpret=True, _poison=NAN)
  ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=0.125)
  assert_matches_oracle("garbage", out, lse, ref, ref_lse, "float32")


@pytest.mark.parametrize("causal,t,bq,bk,dtype", [(True, 100, 32, 16, "float32"), (False, 40, 16, 32, "float32"),
                                                  (True, 64, 16, 16, "bfloat16")])
def test_flash_matches_oracle(causal, t, bq, bk, dtype):
  q, k, v, _ = _qkv(t, 2, t, 4, 2, 128, dtype)
  out, lse = tpu_flash_attention(q, k, v, scale=0.1, causal=causal, block_q=bq, block_k=bk, interpret=True,
                                 _poison=NAN)
  ref, ref_lse = attention_reference(q, k, v, scale=0.1, causal=causal, out_dtype=jnp.float32)
  assert_matches_oracle(f"flash causal={causal}", out, lse, ref, ref_lse, dtype)


def test_poison_exposes_unwritten_outputs(monkeypatch):
  from lcinfer.pallas_kernels import tpu_block_sparse as tbs

  def lazy(*refs, **kw):
    pass
  monkeypatch.setattr(tbs, "_kernel", lazy)
  q = jnp.ones((1, 8, 1, 64), jnp.float32)
  out, lse = tpu_flash_attention(q, q, q, scale=0.1, block_q=8, block_k=8, interpret=True, _poison=NAN)
  assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()


def test_unsupported_calls_fall_through_with_reasons():
  q, k, v, _ = _qkv(0, 1, 32, 2, 1, 64, "float32")
  layout = blocks_from_mask(jnp.ones((1, 2, 2, 2), bool), 2, block_q=16, block_k=16)
  with pytest.raises(dispatch.DispatchError, match="needs a TPU; pass interpret=True"):
    dispatch.call("block_sparse_attention", ("tpu",), q, k, v, layout, scale=0.1)
  out, _ = dispatch.call("block_sparse_attention", ("tpu", "xla"), q, k, v, layout, scale=0.1)
  ref, _ = block_sparse_reference(q, k, v, layout, scale=0.1)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)   # fell through to the reference
  with pytest.raises(dispatch.DispatchError, match="tpu: layout.block_q must be a power of two"):
    dispatch.call("flash_attention", ("tpu",), q, k, v, scale=0.1, block_q=24, interpret=True)
  with pytest.raises(dispatch.DispatchError, match="needs a TPU; pass interpret=True"):
    dispatch.call("flash_attention", ("tpu",), q, k, v, scale=0.1)
  assert dispatch.implementations("flash_attention")[-1] == "xla"  # the reference is the last resort


def test_bad_blocks_raise():
  q, k, v, _ = _qkv(0, 1, 32, 2, 1, 64, "float32")
  with pytest.raises(ValueError, match="block_q must be a power of two >= 8"):
    tpu_flash_attention(q, k, v, scale=0.1, block_q=12, block_k=16, interpret=True)


# -- flash-decoding (pallas_kernels/tpu_decode.py) -------------------------------------------------
from test_pallas_decode import CASES as DECODE_CASES, _inputs as decode_inputs  # noqa: E402
from lcinfer.pallas_kernels import tpu_decode  # noqa: E402
from lcinfer.pallas_kernels.decode import decode_reference  # noqa: E402


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_matches_oracle(case):
  """The GPU kernel's cases (cache layouts with holes and shuffled slots, windows, GQA 1/4/8, T 1
  and 3, short last splits, capacities that need padding), partials NaN-poisoned."""
  name, b, t, c, h, kh, d, dtype, kw = case
  kw = dict(kw)
  q, k, v, pos, q_pos = decode_inputs(zlib.crc32(name.encode()), b, t, c, h, kh, d, jnp.dtype(dtype),
                                      kw.pop("layout"))
  out, lse = tpu_decode.tpu_decode_attention(q, k, v, pos, q_pos, scale=d ** -0.5, interpret=True,
                                             _poison=NAN, **kw)
  ref, ref_lse = decode_reference(q, k, v, pos, q_pos, scale=d ** -0.5, window=kw.get("window"),
                                  out_dtype=jnp.float32)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)


def test_decode_poison_exposes_unwritten_outputs(monkeypatch):
  monkeypatch.setattr(tpu_decode, "_kernel", lambda *refs, **kw: None)
  q = jnp.ones((1, 1, 2, 64), jnp.float32)   # a shape no other test uses: a fresh trace
  k = jnp.ones((1, 1, 19, 64), jnp.float32)
  pos = jnp.arange(19, dtype=jnp.int32)[None, None]
  out, lse = tpu_decode.tpu_decode_attention(q, k, k, pos, jnp.asarray([[18]]), scale=0.1, num_splits=2,
                                             block_k=16, interpret=True, _poison=NAN)
  assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()


def test_decode_dispatch_and_unsupported_calls():
  assert dispatch.implementations("decode_attention") == ("triton", "tpu", "xla")
  q = jnp.ones((1, 2, 4, 64), jnp.float32)
  k = jnp.ones((1, 2, 9, 64), jnp.float32)
  pos, q_pos = jnp.zeros((1, 2, 9), jnp.int32), jnp.asarray([[3, 8]], jnp.int32)
  with pytest.raises(dispatch.DispatchError, match="tpu: the TPU flash-decoding kernel needs a TPU"):
    dispatch.call("decode_attention", ("tpu",), q, k, k, pos, q_pos, scale=0.1)
  with pytest.raises(dispatch.DispatchError, match=r"tpu: Triton-only options \['num_warps'\]"):
    dispatch.call("decode_attention", ("tpu",), q, k, k, pos, q_pos, scale=0.1, num_warps=4, interpret=True)
  with pytest.raises(ValueError, match="window must be a positive int"):  # malformed: no fallback
    dispatch.call("decode_attention", ("tpu", "xla"), q, k, k, pos, q_pos, scale=0.1, window=0, interpret=True)
  big = jnp.ones((1, 9, 256, 64), jnp.float32)   # G*T = 128 * 9 rows per kv head
  with pytest.raises(dispatch.Unsupported, match="query rows per kv head"):
    tpu_decode.tpu_decode_attention(big, k, k, pos, jnp.zeros((1, 9), jnp.int32), scale=0.1, interpret=True)
  out, lse = dispatch.call("decode_attention", ("tpu", "xla"), q, k, k, pos, q_pos, scale=0.1, interpret=True)
  ref, ref_lse = decode_reference(q, k, k, pos, q_pos, scale=0.1, out_dtype=jnp.float32)
  assert_matches_oracle("dispatch", out, lse, ref, ref_lse, "float32")


# -- flash-decoding over quantized caches ---------------------------------------------------------------
from test_pallas_decode_quant import CASES as QUANT_CASES, _inputs as quant_inputs  # noqa: E402
from lcinfer.pallas_kernels.decode_quant import quantized_decode_reference  # noqa: E402


# the GPU kernel's cases that between them cover every feature (interpret mode is slow: ~5 s each)
QUANT_TPU = [c for c in QUANT_CASES if c[0] in ("int4_kivi", "int2_g8", "int4_window_holes", "mixed_bits_shuffled",
                                                "bf16_int4_residual_window", "groups_shorter_than_block",
                                                "f16_int8_int4")]


@pytest.mark.parametrize("case", QUANT_TPU, ids=[c[0] for c in QUANT_TPU])
def test_quantized_decode_matches_oracle(case):
  """int8 / int4 / int2, per token and per channel, token groups shorter and longer than a block,
  residual window with a sliding window, holes and shuffled slots, f16; partials NaN-poisoned."""
  name, dtype = case[0], case[7]
  q, k_q, v_q, pos, q_pos, kw = quant_inputs(case, zlib.crc32(case[0].encode()))
  scale = q.shape[-1] ** -0.5
  out, lse = tpu_decode.tpu_quantized_decode_attention(q, k_q, v_q, pos, q_pos, scale=scale, interpret=True,
                                                       _poison=NAN, **kw)
  ref_kw = {key: val for key, val in kw.items() if key in ("window", "residual")}
  ref, ref_lse = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=scale, **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_matches_oracle(name, out, lse, ref.astype(jnp.float32), ref_lse, dtype)


def test_quantized_decode_unsupported_blocks():
  from lcinfer.pallas_kernels import quant
  q, k_q, v_q, pos, q_pos, _ = quant_inputs(QUANT_CASES[1], 3)       # C = 96, values per token
  k24 = quant.quantize(quant.dequantize(k_q), bits=4, axis="channel", group=24)   # groups of 24 keys
  for bk, why in ((16, "nest with the token groups"), (64, "must divide C = 96")):
    with pytest.raises(dispatch.Unsupported, match=why):
      tpu_decode.tpu_quantized_decode_attention(q, k24, v_q, pos, q_pos, scale=0.1, block_k=bk, interpret=True)
  with pytest.raises(dispatch.Unsupported, match="no block of keys divides C = 96 and nests"):
    tpu_decode.tpu_quantized_decode_attention(q, k24, v_q, pos, q_pos, scale=0.1, interpret=True)
  with pytest.raises(dispatch.Unsupported, match="Triton-only"):
    tpu_decode.tpu_quantized_decode_attention(q, k_q, v_q, pos, q_pos, scale=0.1, num_stages=2, interpret=True)
  with pytest.raises(dispatch.Unsupported, match="needs a TPU"):
    tpu_decode.tpu_quantized_decode_attention(q, k_q, v_q, pos, q_pos, scale=0.1)
  out, _ = dispatch.call("quantized_decode_attention", ("tpu", "xla"), q, k24, v_q, pos, q_pos, scale=0.1,
                         interpret=True)   # falls through to the reference
  ref, _ = quantized_decode_reference(q, k24, v_q, pos, q_pos, scale=0.1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


# -- flash attention: every mask feature ------------------------------------------------------------
from test_pallas_flash import CASES as FLASH_CASES, _inputs as flash_inputs  # noqa: E402


# the Triton kernel's cases with a mask feature (the plain causal / full ones: test_flash_matches_oracle)
FLASH_TPU = [c for c in FLASH_CASES if {"kv_offset", "window", "segments", "lengths"} & set(c[-1])
             or c[0] == "noncausal_odd"]


@pytest.mark.parametrize("case", FLASH_TPU, ids=[c[0] for c in FLASH_TPU])
def test_flash_mask_features_match_oracle(case):
  """kv_offset (chunked prefill, T != S), sliding windows, segment ids, per-row lengths, full
  attention with S != T, GQA 1/4/8, head_dim 64/128; outputs NaN-poisoned."""
  name, b, t, s, h, kh, d, dtype, kw = case
  q, k, v, kw = flash_inputs(zlib.crc32(name.encode()), b, t, s, h, kh, d, jnp.dtype(dtype), kw)
  out, lse = tpu_flash_attention(q, k, v, scale=d ** -0.5, interpret=True, _poison=NAN, **kw)
  ref_kw = {key: val for key, val in kw.items() if key not in ("block_q", "block_k")}
  ref, ref_lse = attention_reference(q, k, v, scale=d ** -0.5, out_dtype=jnp.float32, **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)


def test_flash_window_skips_blocks_outside_it():
  """The flash layout lists only the blocks a query block can see: the causal diagonal shifted by
  kv_offset, from the window's start."""
  from lcinfer.pallas_kernels.tpu_block_sparse import causal_layout
  lay = causal_layout(1, 1, 64, 100, 16, 16, True, kv_offset=36, window=7)
  q0 = np.arange(4) * 16
  first, last = (36 + q0 - 6) // 16, np.minimum((36 + q0 + 15) // 16, 6)
  np.testing.assert_array_equal(np.asarray(lay.count)[0, 0], last - first + 1)
  np.testing.assert_array_equal(np.asarray(lay.kv_block_idx)[0, 0, :, 0], first)
  assert lay.max_blocks == 3   # 16 rows + a 7-key window span 22 keys: at most 3 of the 7 blocks
