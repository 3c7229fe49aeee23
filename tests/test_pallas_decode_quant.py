"""Quantized KV layouts (pallas_kernels/quant.py) and flash-decoding over them
(pallas_kernels/decode_quant.py), in interpret mode on CPU; the gpu-marked copies compile them."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle, emulate_ptx
from lcinfer.pallas_kernels import dispatch, quant
from lcinfer.pallas_kernels.decode_quant import quantized_decode_attention, quantized_decode_reference

NAN = float("nan")


# -- the layout, against a numpy model of the module docstring ---------------------------------------
def _np_quantize(x, bits, axis, group):
  """Independent numpy quantizer: (codes [B, K, C, D] ints, scale, zero) per the docstring."""
  b, k, c, d = x.shape
  xg = x.reshape(b, k, c, d // group, group) if axis == "token" else x.reshape(b, k, c // group, group, d)
  red = -1 if axis == "token" else -2
  lo, hi = xg.min(red, keepdims=True), xg.max(red, keepdims=True)
  scale = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0).astype(np.float32)
  codes = np.clip(np.round((xg - lo) / scale), 0, 2 ** bits - 1).astype(np.int64).reshape(b, k, c, d)
  return codes, np.squeeze(scale, red), np.squeeze(lo, red)


@pytest.mark.parametrize("bits,axis,group", [(8, "token", 64), (4, "token", 16), (4, "channel", 8),
                                             (2, "token", 32), (2, "channel", 16)])
def test_packing_follows_the_bit_plane_layout(bits, axis, group):
  rng = np.random.default_rng(bits * 7 + group)
  x = rng.standard_normal((2, 3, 32, 64)).astype(np.float32)
  x[0, 0, :, 5] *= 20.0  # an outlier channel
  qt = quant.quantize(jnp.asarray(x), bits=bits, axis=axis, group=group)
  codes, scale, zero = _np_quantize(x, bits, axis, group)
  np.testing.assert_allclose(np.asarray(qt.scale), scale, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(qt.zero), zero, rtol=1e-6)
  f, plane = 8 // bits, 64 // (8 // bits)
  packed = np.asarray(qt.codes).astype(np.int64)
  assert packed.shape == (2, 3, 32, 64 * bits // 8)
  for i in range(f):  # byte j holds channel j + i * D/f in bits [i*bits, (i+1)*bits)
    got = (packed >> (i * bits)) & (2 ** bits - 1)
    want = codes[..., i * plane:(i + 1) * plane]
    assert (np.abs(got - want) <= 1).all() and (got == want).mean() > 0.99  # float rounding ties
  deq = np.asarray(quant.dequantize(qt))
  per_elem = np.repeat(scale, group, -1) if axis == "token" else np.repeat(scale, group, -2)
  assert (np.abs(deq - x) <= 0.5 * per_elem * (1 + 1e-4) + 1e-6).all()  # round-to-nearest bound


def test_constant_groups_are_exact_and_bytes_shrink():
  x = jnp.full((1, 1, 16, 64), 3.25, jnp.float32)
  qt = quant.quantize(x, bits=2, axis="token", group=16)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(qt)), np.asarray(x))
  q4 = quant.quantize(jnp.ones((1, 8, 1024, 128), jnp.bfloat16), bits=4, scale_dtype=jnp.bfloat16)
  bf16_bytes = 8 * 1024 * 128 * 2
  assert quant.nbytes(q4) == bf16_bytes // 4 + 2 * 8 * 1024 * 2  # codes + one bf16 scale and zero/token


# -- the kernel against the oracle --------------------------------------------------------------------
# (name, b, t, c, h, kh, d, dtype, k layout, v layout, kw)
CASES = [
    ("int4_kivi", 1, 1, 128, 4, 1, 64, "float32", (4, "channel", 32), (4, "token", 64), dict(block_k=16)),
    ("int8_token", 2, 3, 96, 4, 2, 64, "float32", (8, "token", 64), (8, "token", 32), dict(num_splits=3)),
    ("int2_g8", 1, 2, 64, 8, 1, 128, "float32", (2, "channel", 16), (2, "token", 32), dict(block_k=16)),
    ("int4_window_holes", 2, 2, 128, 4, 1, 64, "float32", (4, "token", 16), (4, "channel", 64),
     dict(window=37, holes=True, num_splits=4)),
    ("int4_residual", 1, 3, 64, 8, 2, 128, "float32", (4, "channel", 32), (4, "token", 128),
     dict(residual=24, holes=True)),
    # one query: the splits go through the combination kernel (combine.py), then the residual merge
    ("int4_residual_t1", 2, 1, 64, 8, 2, 128, "float32", (4, "channel", 32), (4, "token", 128),
     dict(residual=24, holes=True, num_splits=3)),
    ("mixed_bits_shuffled", 2, 1, 96, 4, 4, 64, "float32", (8, "channel", 32), (2, "token", 16),
     dict(shuffled=True, num_splits=2)),
    ("bf16_int4_residual_window", 2, 2, 128, 16, 2, 128, "bfloat16", (4, "channel", 32), (4, "token", 128),
     dict(residual=32, window=50, holes=True)),
    ("bf16_int2", 1, 1, 256, 4, 1, 64, "bfloat16", (2, "channel", 64), (2, "token", 16), dict()),
    # blocks longer than the per-channel token groups: each key's scale row is gathered
    ("groups_shorter_than_block", 1, 2, 128, 4, 1, 64, "float32", (4, "channel", 16), (4, "channel", 32),
     dict(block_k=64, num_splits=2)),
    ("default_blocks_bf16", 1, 1, 512, 8, 2, 128, "bfloat16", (4, "channel", 32), (2, "token", 128), dict()),
    # f16: codes biased by 1024 (8-bit fits); bf16 + 8-bit codes: the plain conversion
    ("f16_int8_int4", 1, 2, 128, 8, 2, 64, "float16", (8, "channel", 32), (4, "token", 64), dict(holes=True)),
    ("bf16_int8", 1, 1, 128, 4, 1, 128, "bfloat16", (8, "channel", 64), (8, "token", 128), dict()),
]


def _inputs(case, seed):
  name, b, t, c, h, kh, d, dtype, klay, vlay, kw = case
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(dtype)
  kw = dict(kw)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dt)
  k = rng.standard_normal((b, kh, c, d)).astype(np.float32)
  k[..., 3] *= 8.0  # outlier channel, as in real keys
  v = rng.standard_normal((b, kh, c, d)).astype(np.float32)
  sdt = jnp.float32 if dtype == "float32" else jnp.bfloat16
  k_q = quant.quantize(jnp.asarray(k), bits=klay[0], axis=klay[1], group=klay[2], scale_dtype=sdt)
  v_q = quant.quantize(jnp.asarray(v), bits=vlay[0], axis=vlay[1], group=vlay[2], scale_dtype=sdt)
  pos = np.tile(np.arange(c, dtype=np.int32), (b, kh, 1))
  if kw.pop("holes", False):
    pos = np.where(rng.random(pos.shape) < 0.2, -1, pos)
  if kw.pop("shuffled", False):
    pos = np.stack([np.stack([rng.permutation(pos[i, j]) for j in range(kh)]) for i in range(b)])
  n_res = kw.pop("residual", 0)
  total = c + n_res
  q_pos = np.tile(np.arange(total - t, total, dtype=np.int32), (b, 1))
  if b > 1:
    q_pos[1, 0] = -1  # a padded query row: sees nothing
  if n_res:
    rk = jnp.asarray(rng.standard_normal((b, kh, n_res, d)), dt)
    rv = jnp.asarray(rng.standard_normal((b, kh, n_res, d)), dt)
    rp = np.tile(np.arange(c, total, dtype=np.int32), (b, kh, 1))
    kw["residual"] = (rk, rv, jnp.asarray(rp))
  return q, k_q, v_q, jnp.asarray(pos), jnp.asarray(q_pos), kw


def _check(case, interpret):
  name, *_, d, dtype = case[:8]
  q, k_q, v_q, pos, q_pos, kw = _inputs(case, zlib.crc32(case[0].encode()))
  scale = q.shape[-1] ** -0.5
  out, lse = quantized_decode_attention(q, k_q, v_q, pos, q_pos, scale=scale, interpret=interpret,
                                        _poison=NAN, **kw)
  ref_kw = {key: val for key, val in kw.items() if key in ("window", "residual")}
  ref, ref_lse = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=scale, **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == jnp.float32
  return assert_matches_oracle(name, out, lse, ref.astype(jnp.float32), ref_lse, dtype)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_interpret(case):
  _check(case, interpret=True)


def test_cases_cover_empty_rows():
  empty = _check(CASES[1], interpret=True)
  assert empty.any() and (~empty).any()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_gpu(case):
  _check(case, interpret=False)


@pytest.mark.parametrize("bits,dtype", [(4, jnp.bfloat16), (2, jnp.bfloat16), (4, jnp.float16),
                                        (2, jnp.float16), (8, jnp.float16)])  # bf16 + 8-bit: no PTX
def test_unpacking_ptx_gives_the_codes(bits, dtype):
  """The inline PTX (compiled path) against the definition: plane i of byte j is its code
  (byte >> i*bits) & mask, exactly, in the 16-bit lanes. GPU-only code, so its instructions are
  modelled here; the gpu tests run it for real."""
  from lcinfer.pallas_kernels.decode_quant import MAGIC, _plane_asm
  from lcinfer.pallas_kernels.decode_quant import unpack_mode
  assert unpack_mode(dtype, bits, interpret=False) == "asm"
  assert unpack_mode(jnp.bfloat16, 8, interpret=False) == "float"  # 255 does not fit bf16's mantissa
  magic16 = MAGIC[jnp.dtype(dtype)][0]
  kind = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f16"
  rng = np.random.default_rng(bits)
  raw = rng.integers(0, 256, (64, 4), dtype=np.uint8)
  word = raw.view("<u4")[:, 0]
  for plane in range(8 // bits):
    regs = emulate_ptx(_plane_asm(bits, plane, magic16, kind), {"$2": word}, dtype)
    lo, hi = regs["$0"], regs["$1"]
    halves = np.stack([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], axis=1).astype(np.uint16)
    got = halves.view(np.dtype(jnp.dtype(dtype))).astype(np.float32)
    want = ((raw >> (plane * bits)) & ((1 << bits) - 1)).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_quantization_error_is_what_the_oracle_sees():
  """The oracle attends over the dequantized cache: 8-bit is close to full precision, 2-bit is not
  (the kernel must not be compared against full precision)."""
  from lcinfer.pallas_kernels.decode import decode_reference
  case = CASES[0]
  q, k_q, v_q, pos, q_pos, _ = _inputs(case, 0)
  k, v = quant.dequantize(k_q), quant.dequantize(v_q)
  ref, _ = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=0.125)
  direct, _ = decode_reference(q, k, v, pos, q_pos, scale=0.125)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(direct), rtol=1e-6, atol=1e-6)


# -- dispatch and bad input ----------------------------------------------------------------------------
def test_narrow_token_groups_fall_back_to_the_oracle():
  q, k_q, v_q, pos, q_pos, _ = _inputs(CASES[0], 1)
  v8 = quant.quantize(quant.dequantize(v_q), bits=4, axis="token", group=8)  # 8-wide pieces: no MMA
  with pytest.raises(dispatch.Unsupported, match="narrower than a 16-wide"):
    quantized_decode_attention(q, k_q, v8, pos, q_pos, scale=0.1, interpret=True)
  out, _ = dispatch.call("quantized_decode_attention", ("triton", "xla"), q, k_q, v8, pos, q_pos, scale=0.1,
                         interpret=True)
  ref, _ = quantized_decode_reference(q, k_q, v8, pos, q_pos, scale=0.1)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
  # the default order reaches the TPU kernel (interpret mode here), which takes any group width
  out, _ = dispatch.call("quantized_decode_attention", None, q, k_q, v8, pos, q_pos, scale=0.1, interpret=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _bad(mutate):
  q, k_q, v_q, pos, q_pos, _ = _inputs(CASES[0], 2)
  args, kw = mutate([q, k_q, v_q, pos, q_pos], {"scale": 0.1, "interpret": True})
  quantized_decode_attention(*args, **kw)


@pytest.mark.parametrize("mutate,match", [
    (lambda a, kw: ([a[0], a[1], 1.0, *a[3:]], kw), "must be lcinfer.pallas_kernels.quant.QuantizedTensor"),
    (lambda a, kw: ([a[0], quant.QuantizedTensor(a[1].codes.astype(jnp.int8), a[1].scale, a[1].zero, 4,
                                                  "channel", 32), *a[2:]], kw), "codes must be a uint8"),
    (lambda a, kw: ([a[0], quant.QuantizedTensor(a[1].codes, a[1].scale[:, :, :1], a[1].zero, 4, "channel", 32),
                     *a[2:]], kw), r"scale must be \(1, 1, 4, 64\)"),
    (lambda a, kw: ([a[0], quant.QuantizedTensor(a[1].codes, a[1].scale, a[1].zero, 3, "channel", 32),
                     *a[2:]], kw), "bits must be one of"),
    (lambda a, kw: ([a[0], quant.QuantizedTensor(a[1].codes, a[1].scale, a[1].zero, 4, "channel", 48),
                     *a[2:]], kw), "group 48 must divide the cache length"),
    (lambda a, kw: ([a[0][..., :32], *a[1:]], kw), "head_dim mismatch"),
    (lambda a, kw: ([a[0], a[1], quant.quantize(quant.dequantize(a[2])[:, :, :64], bits=4), *a[3:]], kw),
     "same logical shape"),
    (lambda a, kw: ([*a[:3], a[3][:, :, :5], a[4]], kw), "pos must be"),
    (lambda a, kw: (a, {**kw, "residual": (1, 2)}), "residual must be"),
    (lambda a, kw: (a, {**kw, "window": 0}), "window must be a positive int"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
  with pytest.raises(ValueError, match=match):
    _bad(mutate)


def test_quantize_rejects_impossible_layouts():
  x = jnp.zeros((1, 1, 30, 64))
  with pytest.raises(ValueError, match="group 32 must divide the cache length"):
    quant.quantize(x, bits=4, axis="channel", group=32)
  with pytest.raises(ValueError, match="bits must be one of"):
    quant.quantize(x, bits=5)
  with pytest.raises(ValueError, match="group 48 must divide head_dim"):
    quant.quantize(x, bits=4, axis="token", group=48)
