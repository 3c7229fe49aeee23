"""The Pallas flash-attention kernel (interpret mode on CPU), its float32 oracle, the kernel
dispatcher, and the "flash" attention method. GPU-compiled variants are marked `gpu`."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import naive_attention, tiny_llm, assert_matches_oracle
import lcinfer
from lcinfer import attention
from lcinfer.attention.flash import FlashAttention
from lcinfer.pallas_kernels import dispatch, flash_triton
from lcinfer.pallas_kernels.flash_triton import flash_attention
from lcinfer.pallas_kernels.reference import attention_reference

NAN = float("nan")

# (name, B, T, S, H, K, D, dtype, extra kwargs). Shapes are tiny; lengths are odd on purpose
# (tails that are not block multiples), GQA ratios 1/4/8, head_dim 64 and 128.
CASES = [
    ("t1", 1, 1, 1, 4, 4, 64, "float32", dict()),
    ("odd_g4", 2, 17, 17, 4, 1, 64, "float32", dict()),
    ("g8_small_blocks", 1, 100, 100, 8, 1, 64, "float32", dict(block_q=32, block_k=16)),
    ("noncausal_d128", 1, 64, 64, 2, 2, 128, "float32", dict(causal=False)),
    ("noncausal_odd", 1, 17, 100, 4, 4, 64, "float32", dict(causal=False, block_k=32)),
    ("chunked_prefill", 1, 17, 100, 4, 1, 64, "float32", dict(kv_offset=83, block_q=16, block_k=16)),
    ("offset_short_keys", 2, 17, 64, 4, 4, 64, "float32", dict(kv_offset=10, block_k=16)),
    ("window1", 1, 100, 100, 4, 1, 64, "float32", dict(window=1, block_q=32, block_k=16)),
    ("window7_offset", 1, 64, 100, 4, 1, 64, "float32", dict(window=7, kv_offset=36, block_q=16, block_k=16)),
    ("window40", 1, 100, 100, 4, 4, 64, "float32", dict(window=40, block_q=16, block_k=32)),
    ("segments", 2, 100, 100, 4, 1, 64, "float32", dict(segments=True, block_q=32, block_k=32)),
    ("lengths", 2, 17, 17, 4, 1, 64, "float32", dict(lengths=True)),
    ("bf16_window_d128", 2, 100, 100, 8, 2, 128, "bfloat16", dict(window=33, block_q=32, block_k=32)),
    ("bf16_segments", 1, 64, 64, 8, 1, 64, "bfloat16", dict(segments=True, lengths=True, block_q=16, block_k=16)),
    ("bf16_t1_offset", 2, 1, 100, 4, 4, 128, "bfloat16", dict(kv_offset=99, block_k=32)),
]


def _inputs(seed, b, t, s, h, kh, d, dtype, kw):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kh, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kh, d)), dtype)
  kw = dict(kw)
  if kw.pop("segments", False):
    # packed prompts: sorted random segment ids per row; when T != S, queries are the last T keys.
    seg = np.sort(rng.integers(0, 4, (b, s)), axis=1).astype(np.int32)
    kw["q_segment_ids"], kw["kv_segment_ids"] = jnp.asarray(seg[:, s - t:]), jnp.asarray(seg)
  if kw.pop("lengths", False):
    kw["q_lengths"] = jnp.asarray(rng.integers(1, t + 1, (b,)), jnp.int32).at[0].set(t)
    kw["kv_lengths"] = jnp.asarray(rng.integers(0, s + 1, (b,)), jnp.int32).at[-1].set(0)
  return q, k, v, kw


def _check_against_oracle(case, interpret, seed):
  name, b, t, s, h, kh, d, dtype, kw = case
  q, k, v, kw = _inputs(seed, b, t, s, h, kh, d, jnp.dtype(dtype), kw)
  scale = d ** -0.5
  # Poisoning: the kernel's output buffers start as NaN-filled inputs aliased to the outputs
  # (input_output_aliases), so any output element (out or lse) that the kernel fails to write
  # stays NaN. The checks below would then fail: NaN is neither finite, nor -inf, nor 0, and
  # assert_allclose treats NaN against a number as a mismatch.
  # (test_poison_exposes_unwritten_outputs shows that a kernel that writes nothing fails them.)
  out, lse = flash_attention(q, k, v, scale=scale, interpret=interpret, _poison=NAN, **kw)
  ref_kw = {key: val for key, val in kw.items() if key not in ("block_q", "block_k")}
  ref, ref_lse = attention_reference(q, k, v, scale=scale, out_dtype=jnp.float32, **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, t, h) and lse.dtype == jnp.float32
  empty = assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)
  return empty


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_interpret(case):
  _check_against_oracle(case, interpret=True, seed=zlib.crc32(case[0].encode()))


def _random_geometry(seed):
  """A seeded draw of the mask geometry that decides which KV blocks are interior (unmasked),
  window edge or diagonal: lengths, offset, window and block sizes."""
  rng = np.random.default_rng(seed)
  bq, bk = (int(x) for x in rng.choice([16, 32, 64], 2))
  t = int(rng.integers(1, 150))
  offset = int(rng.integers(0, 60)) if rng.random() < 0.5 else 0
  s = t + offset
  kw = dict(block_q=bq, block_k=bk, kv_offset=offset)
  if rng.random() < 0.6:
    kw["window"] = int(rng.integers(1, s + 20))
  dtype = "bfloat16" if rng.random() < 0.3 else "float32"
  return (f"geometry{seed}", 1, t, s, 2, 1, 64, dtype, kw)


@pytest.mark.parametrize("seed", range(8))
def test_kernel_random_geometry_interpret(seed):
  _check_against_oracle(_random_geometry(seed), interpret=True, seed=100 + seed)


def test_sweep_covers_empty_and_full_rows():
  # the lengths cases must exercise both kinds of lse rows, else the -inf checks test nothing
  empty = _check_against_oracle(CASES[11], interpret=True, seed=5)
  assert empty.any() and (~empty).any()


def test_poison_exposes_unwritten_outputs(monkeypatch):
  """A kernel that writes nothing leaves the NaN poison in place: the poisoning really checks."""
  def lazy_kernel(*refs, **kw):
    pass
  monkeypatch.setattr(flash_triton, "_kernel", lazy_kernel)
  q = jnp.ones((1, 3, 2, 64), jnp.float32)  # a shape no other test uses: a fresh trace
  out, lse = flash_attention(q, q, q, scale=0.1, interpret=True, _poison=NAN)
  assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_gpu(case):
  _check_against_oracle(case, interpret=False, seed=zlib.crc32(case[0].encode()))


@pytest.mark.gpu
def test_kernel_gpu_default_blocks_long():
  case = ("gpu_long", 1, 1000, 1000, 8, 2, 128, "bfloat16", dict(window=300))
  _check_against_oracle(case, interpret=False, seed=3)
  case = ("gpu_long_f32", 2, 333, 333, 4, 1, 64, "float32", dict(segments=True))
  _check_against_oracle(case, interpret=False, seed=4)


# -- the oracle itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("offset,window,segments", [(0, None, False), (5, 4, False), (0, None, True)])
def test_oracle_matches_dense_method(offset, window, segments):
  rng = np.random.default_rng(offset + (window or 0))
  b, t, h, kh, d = 2, 11, 4, 2, 16
  s = t + offset
  q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
             for sh in ((b, t, h, d), (b, s, kh, d), (b, s, kh, d)))
  q_pos = jnp.tile(jnp.arange(offset, s, dtype=jnp.int32), (b, 1))
  kv_pos = jnp.tile(jnp.arange(s, dtype=jnp.int32), (b, 1))
  seg_kw, ref_kw = {}, {}
  if segments:
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, s)), axis=1), jnp.int32)
    seg_kw = dict(q_seg_BT=seg[:, offset:], kv_seg_BS=seg)
    ref_kw = dict(q_segment_ids=seg[:, offset:], kv_segment_ids=seg)
  out, lse = attention_reference(q, k, v, scale=0.25, window=window, kv_offset=offset, **ref_kw)
  d_out, d_lse = attention.get("dense").prefill(q, k, v, q_pos_BT=q_pos, kv_pos_BS=kv_pos, scale=0.25,
                                                window=window, **seg_kw)
  np.testing.assert_allclose(out, d_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, d_lse, rtol=1e-5, atol=1e-5)
  if not segments:
    n_out, n_lse = naive_attention(q, k, v, np.asarray(q_pos), np.asarray(kv_pos), 0.25, window)
    np.testing.assert_allclose(out, n_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-5, atol=1e-5)


# -- dispatcher -----------------------------------------------------------------------------------
def test_dispatch_falls_through_and_lists_reasons():
  op = "test_only_op"
  seen = []

  def a(x, *, interpret):
    seen.append(("a", interpret))
    raise NotImplementedError("a cannot")

  def b(x, *, interpret):
    seen.append(("b", interpret))
    raise dispatch.Unsupported("b cannot either")

  def c(x, *, interpret):
    return x + 1

  def bad(x, *, interpret):
    raise ValueError("malformed call")

  for name, fn in (("a", a), ("b", b), ("c", c), ("bad", bad)):
    dispatch.register(op, name, fn)
  assert dispatch.implementations(op) == ("a", "b", "c", "bad")
  assert dispatch.call(op, None, 1, interpret=True) == 2
  assert seen == [("a", True), ("b", True)]
  with pytest.raises(dispatch.DispatchError) as e:
    dispatch.call(op, ("a", "nope", "b"), 1)
  msg = str(e.value)
  assert "a: a cannot" in msg and "b: b cannot either" in msg and "nope: not registered" in msg
  assert [n for n, _ in e.value.reasons] == ["a", "nope", "b"]
  with pytest.raises(ValueError, match="malformed"):  # real errors are not swallowed
    dispatch.call(op, ("bad", "c"), 1)
  with pytest.raises(ValueError, match="already registered"):
    dispatch.register(op, "a", a)
  with pytest.raises(KeyError, match="unknown op"):
    dispatch.call("no_such_op", None, 1)


def test_dispatch_flash_falls_back_to_xla():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 5, 2, 32)), jnp.float32)  # head_dim 32: not in the kernel
  out, lse = dispatch.call("flash_attention", ("triton", "xla"), q, q, q, scale=0.2, interpret=True)
  ref, ref_lse = attention_reference(q, q, q, scale=0.2)
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  with pytest.raises(dispatch.DispatchError, match=r"triton: head_dim 32 .*supported: 64, 128"):
    dispatch.call("flash_attention", ("triton",), q, q, q, scale=0.2, interpret=True)
  if not any(dev.platform == "gpu" for dev in jax.devices()):
    q64 = jnp.ones((1, 4, 2, 64), jnp.float32)
    with pytest.raises(dispatch.DispatchError, match="needs a CUDA GPU; pass interpret=True"):
      dispatch.call("flash_attention", "triton", q64, q64, q64, scale=0.2, interpret=False)
    out, _ = dispatch.call("flash_attention", None, q64, q64, q64, scale=0.2)  # falls to xla
    assert out.shape == q64.shape


# -- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, kw: (q, k[..., :32], v[..., :32], kw), "head_dim mismatch"),
    (lambda q, k, v, kw: (q, k, v[:, :3], kw), "k and v must have the same shape"),
    (lambda q, k, v, kw: (q.astype(jnp.bfloat16), k, v, kw), "share a dtype"),
    (lambda q, k, v, kw: (q[:, :, :3], k, v, kw), "multiple of kv heads"),
    (lambda q, k, v, kw: (q, k, v, {**kw, "window": 0}), "window must be a positive int"),
    (lambda q, k, v, kw: (q, k, v, {**kw, "window": 4, "causal": False}), "window needs causal"),
    (lambda q, k, v, kw: (q, k, v, {**kw, "block_q": 24}), "block_q must be a power of two"),
    (lambda q, k, v, kw: (q, k, v, {**kw, "block_k": 8}), "block_k must be a power of two >= 16"),
    (lambda q, k, v, kw: (q, k, v, {**kw, "q_segment_ids": jnp.zeros((1, 5), jnp.int32)}), "both"),
    (lambda q, k, v, kw: (q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), kw), "dtype must be"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
  q = jnp.ones((1, 5, 4, 64), jnp.float32)
  k = v = jnp.ones((1, 5, 2, 64), jnp.float32)
  q, k, v, kw = mutate(q, k, v, dict(scale=0.1, interpret=True))
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, **kw)


# -- the "flash" attention method -----------------------------------------------------------------
def test_flash_method_registration_and_supports():
  cfg = lcinfer.ModelConfig.from_hf({**_TINY64})
  m = attention.get("flash")
  assert isinstance(m, FlashAttention) and isinstance(m, attention.AttentionMethod)
  hash(FlashAttention(interpret=True))  # a static jit argument
  if not any(dev.platform == "gpu" for dev in jax.devices()):
    assert "needs a GPU or a TPU (use interpret mode in tests" in m.supports(cfg, None, "prefill")
    assert attention.resolve("auto", cfg, None, "prefill").name == "dense"  # flash is never auto
  assert FlashAttention(interpret=True).supports(cfg, None, "prefill") is None
  assert "prefill only" in FlashAttention(interpret=True).supports(cfg, None, "decode")
  cfg16 = lcinfer.ModelConfig.from_hf({**_TINY64, "hidden_size": 64, "num_attention_heads": 4})
  assert "head_dim" in FlashAttention(interpret=True).supports(cfg16, None, "prefill")
  with pytest.raises(NotImplementedError):
    m.decode(None, None, None, q_pos_BT=None, kv_pos_BKC=None, scale=1.0)


_TINY64 = dict(model_type="llama", vocab_size=128, hidden_size=128, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
               eos_token_id=2)


def _model_logits_match(interpret, impls=("triton",)):
  # head_dim 64 (the kernel's smallest), GQA 2:1, two right-padded rows.
  over = {key: val for key, val in _TINY64.items() if key not in ("model_type",)}
  llm = tiny_llm(**over)
  from lcinfer.engine.core import forward_logits
  rng = np.random.default_rng(0)
  t = 21
  tokens = jnp.asarray(rng.integers(3, 128, (2, t)), jnp.int32)
  lengths = np.array([t, 13])
  positions = jnp.asarray(np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1), jnp.int32)
  flash = FlashAttention(interpret=interpret, implementations=impls)  # kernel or error, no fallback
  got = forward_logits(llm.graphdef, llm.params, tokens, positions, attention=flash)
  want = forward_logits(llm.graphdef, llm.params, tokens, positions, attention=attention.get("dense"))
  valid = np.asarray(positions) >= 0
  got, want = np.asarray(got)[valid], np.asarray(want)[valid]
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_flash_method_in_tiny_model_matches_dense():
  _model_logits_match(interpret=True)


def test_flash_method_in_tiny_model_matches_dense_on_the_tpu_kernel():
  """Right-padded rows reach the TPU kernel as segment ids that never match (TPU interpret mode)."""
  _model_logits_match(interpret=True, impls=("tpu",))


@pytest.mark.gpu
def test_flash_method_in_tiny_model_matches_dense_gpu():
  _model_logits_match(interpret=False)


def test_flash_method_t_ne_s_goes_to_dense():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 3, 2, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 7, 1, 64)), jnp.float32)
  qp, kp = jnp.arange(4, 7)[None], jnp.arange(7)[None]
  out, lse = FlashAttention(interpret=True).prefill(q, k, k, q_pos_BT=qp, kv_pos_BS=kp, scale=0.1)
  ref, ref_lse = attention.get("dense").prefill(q, k, k, q_pos_BT=qp, kv_pos_BS=kp, scale=0.1)
  np.testing.assert_allclose(out, ref, rtol=1e-6)
