"""The Pallas flash-decoding kernel (interpret mode on CPU), its float32 oracle, its dispatcher
entry, and the "flash_decode" attention method. GPU-compiled variants are marked `gpu`."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import naive_attention, tiny_llm, assert_matches_oracle
from lcinfer import attention, engine
from lcinfer.attention.flash_decode import FlashDecode
from lcinfer.pallas_kernels import decode as decode_mod
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.decode import decode_attention, decode_reference

NAN = float("nan")

# (name, B, T, C, H, K, D, dtype, kwargs). C 17/100/256 (tails that are not block * split
# multiples), GQA ratios 1/4/8, T 1 and 3, head_dim 64 and (sparingly) 128.
# Cache layouts: "seq" (slot i holds pos i), "holes" (random -1 slots), "shuffled" (a random slot
# permutation per kv head, with holes), "partial" (only the first slots filled).
CASES = [
    ("t1_c17", 1, 1, 17, 4, 4, 64, "float32", dict(layout="seq", block_k=16, num_splits=1)),
    ("g4_t3_holes", 2, 3, 100, 4, 1, 64, "float32", dict(layout="holes", block_k=16, num_splits=4)),
    ("g8_shuffled", 1, 3, 100, 8, 1, 64, "float32", dict(layout="shuffled", block_k=32, num_splits=2)),
    ("g1_window", 2, 3, 256, 2, 2, 64, "float32", dict(layout="shuffled", window=40, block_k=32, num_splits=4)),
    ("window1_t1", 1, 1, 100, 4, 1, 64, "float32", dict(layout="holes", window=1, block_k=16, num_splits=2)),
    ("partial_many_empty_splits", 1, 3, 256, 4, 1, 64, "float32", dict(layout="partial", block_k=16, num_splits=4)),
    ("d128_g4", 1, 3, 100, 8, 2, 128, "float32", dict(layout="shuffled", block_k=32, num_splits=2)),
    ("bf16_g8_window", 2, 3, 256, 8, 1, 64, "bfloat16", dict(layout="shuffled", window=77, block_k=32, num_splits=4)),
    ("bf16_d128_t1", 1, 1, 17, 4, 1, 128, "bfloat16", dict(layout="holes", block_k=16, num_splits=2)),
    # C a block multiple with a split count that does not divide the blocks: a short last split,
    # the cache read in place (no padding)
    ("short_last_split", 1, 2, 96, 4, 2, 64, "float32", dict(layout="shuffled", block_k=16, num_splits=4)),
    # default blocks for C = 80, head_dim 128: block_k shrinks to one that divides C
    ("default_blocks_c80", 1, 1, 80, 8, 2, 128, "float32", dict(layout="holes")),
]


def _inputs(seed, b, t, c, h, kh, d, dtype, layout):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, kh, c, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, kh, c, d)), dtype)
  pos = np.tile(np.arange(c, dtype=np.int32), (b, kh, 1))
  if layout in ("holes", "shuffled"):
    pos = np.where(rng.random(pos.shape) < 0.2, -1, pos)
  if layout == "shuffled":
    for bi in range(b):
      for ki in range(kh):
        pos[bi, ki] = rng.permutation(pos[bi, ki])
  if layout == "partial":
    pos = np.where(pos < c // 5, pos, -1)
  # queries: the last T positions of the cache, except row 1 (if any) which has a padded query
  # (-1) and a query at position 0; row 0's first query sits at a position no key reaches with
  # window=1 when its slot is a hole, so "sees nothing" rows occur naturally and are forced below.
  q_pos = np.tile(np.arange(c - t, c, dtype=np.int32), (b, 1))
  if b > 1:
    q_pos[1, 0] = -1
    if t > 1:
      q_pos[1, 1] = 0
  return q, k, v, jnp.asarray(pos), jnp.asarray(q_pos)


def _check(case, interpret, seed, shuffle_check=False):
  name, b, t, c, h, kh, d, dtype, kw = case
  kw = dict(kw)
  layout = kw.pop("layout")
  q, k, v, pos, q_pos = _inputs(seed, b, t, c, h, kh, d, jnp.dtype(dtype), layout)
  scale = d ** -0.5
  # Poisoning: the partial (per split) outputs start as NaN buffers aliased to the kernel outputs;
  # an element the kernel fails to write stays NaN and reaches the combined result.
  out, lse = decode_attention(q, k, v, pos, q_pos, scale=scale, interpret=interpret, _poison=NAN, **kw)
  ref, ref_lse = decode_reference(q, k, v, pos, q_pos, scale=scale, window=kw.get("window"),
                                  out_dtype=jnp.float32)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (b, t, h) and lse.dtype == jnp.float32
  empty = assert_matches_oracle(name, out, lse, ref, ref_lse, dtype)
  if shuffle_check:  # the same cache with slots permuted per kv head: the same answer
    rng = np.random.default_rng(seed + 1)
    perm = np.stack([rng.permutation(c) for _ in range(kh)])  # [K, C]
    take = lambda x: jnp.take_along_axis(x, jnp.asarray(perm)[None, :, :, None], axis=2)
    pos2 = jnp.take_along_axis(pos, jnp.asarray(perm)[None], axis=2)
    out2, lse2 = decode_attention(q, take(k), take(v), pos2, q_pos, scale=scale, interpret=interpret, **kw)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(out2, np.float32), np.asarray(out, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(lse2), np.asarray(lse), rtol=tol, atol=tol)
  return empty


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_interpret(case):
  _check(case, interpret=True, seed=zlib.crc32(case[0].encode()), shuffle_check=case[0] == "g4_t3_holes")


def test_cases_cover_empty_and_full_rows():
  empty = _check(CASES[1], interpret=True, seed=zlib.crc32(CASES[1][0].encode()))
  assert empty.any() and (~empty).any()


def test_all_empty_cache_gives_zero_and_neg_inf():
  q = jnp.ones((1, 2, 4, 64), jnp.float32)
  k = jnp.ones((1, 2, 40, 64), jnp.float32)
  pos = jnp.full((1, 2, 40), -1, jnp.int32)
  out, lse = decode_attention(q, k, k, pos, jnp.asarray([[5, 6]]), scale=0.1, num_splits=2,
                              block_k=16, interpret=True, _poison=NAN)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_poison_exposes_unwritten_outputs(monkeypatch):
  """A kernel that writes nothing leaves the NaN poison in place: the poisoning really checks."""
  monkeypatch.setattr(decode_mod, "_kernel", lambda *refs, **kw: None)
  q = jnp.ones((1, 1, 2, 64), jnp.float32)  # a shape no other test uses: a fresh trace
  k = jnp.ones((1, 1, 19, 64), jnp.float32)
  pos = jnp.arange(19, dtype=jnp.int32)[None, None]
  out, lse = decode_attention(q, k, k, pos, jnp.asarray([[18]]), scale=0.1, num_splits=2,
                              block_k=16, interpret=True, _poison=NAN)
  assert np.isnan(np.asarray(out)).all() and np.isnan(np.asarray(lse)).all()


def _pad_shapes(jaxpr):
  """Output shapes of every `pad` in a jaxpr, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pad":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        shapes += _pad_shapes(inner)
  return shapes


@pytest.mark.parametrize("c,copied", [(96 * 16, False), (100, True)])
def test_cache_is_read_in_place(c, copied):
  """Decode is bandwidth-bound: a capacity that is a multiple of 16 must not be padded (a padded
  copy would read and write the whole cache again every step); other capacities are."""
  q = jnp.zeros((1, 1, 8, 128), jnp.bfloat16)
  k = jnp.zeros((1, 2, c, 128), jnp.bfloat16)
  pos = jnp.zeros((1, 2, c), jnp.int32)
  qp = jnp.zeros((1, 1), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda *a: decode_attention(*a, scale=0.1, num_splits=5, interpret=True))(
      q, k, k, pos, qp)
  cache_pads = [s for s in _pad_shapes(jaxpr.jaxpr) if len(s) >= 3 and s[2] >= c]
  assert bool(cache_pads) == copied, cache_pads


def test_oracle_matches_naive_and_dense():
  rng = np.random.default_rng(3)
  b, t, h, kh, c, d = 2, 3, 4, 2, 23, 16
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((b, t, h, d), (b, kh, c, d), (b, kh, c, d)))
  pos = np.stack([np.stack([rng.permutation(np.where(rng.random(c) < 0.2, -1, np.arange(c)))
                            for _ in range(kh)]) for _ in range(b)]).astype(np.int32)
  q_pos = np.array([[20, 21, 22], [-1, 0, 22]], np.int32)
  for window in (None, 5):
    out, lse = decode_reference(q, k, v, jnp.asarray(pos), jnp.asarray(q_pos), scale=0.3, window=window)
    d_out, d_lse = attention.get("dense").decode(q, k, v, q_pos_BT=jnp.asarray(q_pos),
                                                 kv_pos_BKC=jnp.asarray(pos), scale=0.3, window=window)
    np.testing.assert_allclose(out, d_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, d_lse, rtol=1e-5, atol=1e-5)
    for ki in range(kh):  # naive takes [B, S, K, D] with shared positions: one kv head at a time
      g = h // kh
      sl = slice(ki * g, (ki + 1) * g)
      n_out, n_lse = naive_attention(q[:, :, sl], jnp.swapaxes(k[:, ki:ki + 1], 1, 2),
                                     jnp.swapaxes(v[:, ki:ki + 1], 1, 2), q_pos, pos[:, ki], 0.3, window)
      np.testing.assert_allclose(out[:, :, sl], n_out, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(lse[:, :, sl], n_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_gpu(case):
  _check(case, interpret=False, seed=zlib.crc32(case[0].encode()), shuffle_check=True)


@pytest.mark.gpu
def test_kernel_gpu_default_config_long():
  _check(("gpu_long", 1, 1, 5000, 32, 8, 128, "bfloat16", dict(layout="holes")), False, seed=1)
  _check(("gpu_long_t8", 2, 8, 3001, 8, 1, 64, "float32", dict(layout="shuffled", window=999)), False, seed=2)


# -- dispatcher and errors ------------------------------------------------------------------------
def test_dispatch_registered_and_falls_back():
  assert dispatch.implementations("decode_attention") == ("triton", "tpu", "xla")
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 32)), jnp.float32)  # head_dim 32: not in the kernel
  k = jnp.asarray(rng.standard_normal((1, 1, 9, 32)), jnp.float32)
  pos, qp = jnp.arange(9, dtype=jnp.int32)[None, None], jnp.asarray([[8]], jnp.int32)
  out, _ = dispatch.call("decode_attention", ("triton", "xla"), q, k, k, pos, qp, scale=0.2, interpret=True)
  ref, _ = decode_reference(q, k, k, pos, qp, scale=0.2)
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  with pytest.raises(dispatch.DispatchError, match=r"triton: head_dim 32 .*supported: 64, 128"):
    dispatch.call("decode_attention", ("triton",), q, k, k, pos, qp, scale=0.2, interpret=True)
  if not any(dev.platform == "gpu" for dev in jax.devices()):
    q64, k64 = jnp.ones((1, 1, 2, 64)), jnp.ones((1, 1, 9, 64))
    with pytest.raises(dispatch.DispatchError, match="needs a CUDA GPU; pass interpret=True"):
      dispatch.call("decode_attention", "triton", q64, k64, k64, pos, qp, scale=0.2)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "k": a["k"][..., :32], "v": a["v"][..., :32]}, "head_dim mismatch"),
    (lambda a: {**a, "v": a["v"][:, :, :3]}, "k and v must have the same shape"),
    (lambda a: {**a, "q": a["q"].astype(jnp.bfloat16)}, "share a dtype"),
    (lambda a: {**a, "q": a["q"][:, :, :3]}, "multiple of kv heads"),
    (lambda a: {**a, "pos": a["pos"][:, :, :5]}, "pos must be"),
    (lambda a: {**a, "q_pos": a["q_pos"][:, :0]}, "q_pos must be"),
    (lambda a: {**a, "pos": a["pos"].astype(jnp.float32)}, "integer"),
    (lambda a: {**a, "window": 0}, "window must be a positive int"),
    (lambda a: {**a, "block_k": 24}, "block_k must be a power of two"),
    (lambda a: {**a, "num_splits": 0}, "num_splits must be a positive int"),
    (lambda a: {**a, "q": a["q"].astype(jnp.int32), "k": a["k"].astype(jnp.int32),
                "v": a["v"].astype(jnp.int32)}, "dtype must be"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
  a = dict(q=jnp.ones((1, 2, 4, 64)), k=jnp.ones((1, 2, 9, 64)), v=jnp.ones((1, 2, 9, 64)),
           pos=jnp.zeros((1, 2, 9), jnp.int32), q_pos=jnp.zeros((1, 2), jnp.int32))
  a = mutate(a)
  kw = {key: a.pop(key) for key in ("window", "block_k", "num_splits") if key in a}
  with pytest.raises(ValueError, match=match):
    decode_attention(a["q"], a["k"], a["v"], a["pos"], a["q_pos"], scale=0.1, interpret=True, **kw)


def test_too_many_rows_is_unsupported():
  q = jnp.ones((1, 9, 16, 64))  # G*T = 144 > 128
  k = jnp.ones((1, 1, 9, 64))
  with pytest.raises(dispatch.Unsupported, match="query rows"):
    decode_attention(q, k, k, jnp.zeros((1, 1, 9), jnp.int32), jnp.zeros((1, 9), jnp.int32),
                     scale=0.1, interpret=True)


# -- the "flash_decode" attention method ----------------------------------------------------------
def test_method_registration_and_supports():
  m = attention.get("flash_decode")
  assert isinstance(m, FlashDecode) and isinstance(m, attention.AttentionMethod)
  hash(FlashDecode(interpret=True))
  llm = tiny_llm(hidden_size=256)
  cfg = llm.config
  assert cfg.head_dim == 64
  if not any(dev.platform == "gpu" for dev in jax.devices()):
    assert "needs a GPU" in m.supports(cfg, None, "decode")
    assert attention.resolve("auto", cfg, None, "decode").name == "dense"  # never auto
  assert FlashDecode(interpret=True).supports(cfg, None, "decode") is None
  assert FlashDecode(interpret=True).supports(cfg, None, "prefill") is None
  assert "head_dim" in FlashDecode(interpret=True).supports(tiny_llm().config, None, "decode")  # head_dim 16


def _model_decode_matches_dense(interpret, impls=("triton",)):
  llm = tiny_llm(num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
  assert llm.config.head_dim == 64
  rng = np.random.default_rng(0)
  toks = np.asarray(rng.integers(3, 128, (2, 21)), np.int32)
  lens = np.array([21, 13])
  method = FlashDecode(interpret=interpret, implementations=impls, num_splits=2, block_k=16)
  caches = []
  for _ in range(2):
    cache = llm.init_cache(2, 48)
    _, cache = engine.prefill(llm.graphdef, llm.params, toks, lens, cache, attention=attention.get("dense"))
    caches.append(cache)
  nxt = jnp.asarray([5, 7], jnp.int32)
  for _ in range(2):  # two steps: the cache written by the first step is read by the second
    got, caches[0] = engine.decode_step(llm.graphdef, llm.params, nxt, caches[0], attention=method)
    want, caches[1] = engine.decode_step(llm.graphdef, llm.params, nxt, caches[1],
                                         attention=llm.decode_attention)
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    nxt = jnp.asarray(np.argmax(want, -1), jnp.int32)


def test_method_in_tiny_model_matches_dense():
  _model_decode_matches_dense(interpret=True)


def test_method_in_tiny_model_matches_dense_on_the_tpu_kernel():
  """The method through the TPU flash-decoding kernel (TPU interpret mode)."""
  _model_decode_matches_dense(interpret=True, impls=("tpu",))


@pytest.mark.gpu
def test_method_in_tiny_model_matches_dense_gpu():
  _model_decode_matches_dense(interpret=False)
