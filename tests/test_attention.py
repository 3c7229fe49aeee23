import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import naive_attention
from lcinfer import attention
from lcinfer.errors import ConfigError

DENSE = attention.get("dense")


def _qkv(rng, b, t, s, h, kh, d, dtype=np.float32):
  return (rng.standard_normal((b, t, h, d)).astype(dtype), rng.standard_normal((b, s, kh, d)).astype(dtype),
          rng.standard_normal((b, s, kh, d)).astype(dtype))


@pytest.mark.parametrize("h,kh", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_dense_prefill_matches_float64_reference(h, kh, window):
  rng = np.random.default_rng(h * 10 + kh + (window or 0))
  b, t, d = 2, 13, 16
  q, k, v = _qkv(rng, b, t, t, h, kh, d)
  pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  pos[1, 9:] = -1  # right padding in row 1
  out, lse = DENSE.prefill(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos_BT=jnp.asarray(pos),
                           kv_pos_BS=jnp.asarray(pos), scale=d ** -0.5, window=window)
  ref, ref_lse = naive_attention(q, k, v, pos, pos, d ** -0.5, window)
  valid = pos >= 0
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse)[valid], ref_lse[valid], rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(np.asarray(lse)[~valid]))  # padding queries see nothing
  assert np.all(np.asarray(out)[~valid] == 0)


def test_dense_prefill_segment_ids_isolate_packed_sequences():
  rng = np.random.default_rng(1)
  b, t, h, kh, d = 1, 12, 4, 2, 8
  q, k, v = _qkv(rng, b, t, t, h, kh, d)
  seg = np.array([[0] * 5 + [1] * 7], np.int32)
  pos = np.array([list(range(5)) + list(range(7))], np.int32)  # positions restart per segment
  out, _ = DENSE.prefill(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos_BT=jnp.asarray(pos),
                         kv_pos_BS=jnp.asarray(pos), scale=0.3, q_seg_BT=jnp.asarray(seg), kv_seg_BS=jnp.asarray(seg))
  ref, _ = naive_attention(q, k, v, pos, pos, 0.3, q_seg=seg, kv_seg=seg)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # the second sequence alone gives the same output
  alone, _ = DENSE.prefill(jnp.asarray(q[:, 5:]), jnp.asarray(k[:, 5:]), jnp.asarray(v[:, 5:]),
                           q_pos_BT=jnp.asarray(pos[:, 5:]), kv_pos_BS=jnp.asarray(pos[:, 5:]), scale=0.3)
  np.testing.assert_allclose(np.asarray(out)[:, 5:], np.asarray(alone), rtol=1e-5, atol=1e-6)


def test_decode_over_cache_uses_positions_not_slot_order():
  rng = np.random.default_rng(2)
  b, c, h, kh, d = 2, 20, 8, 2, 16
  k = rng.standard_normal((b, kh, c, d)).astype(np.float32)
  v = rng.standard_normal((b, kh, c, d)).astype(np.float32)
  pos = np.full((b, kh, c), -1, np.int32)
  pos[:, :, :15] = np.arange(15)
  q = rng.standard_normal((b, 2, h, d)).astype(np.float32)
  q_pos = np.array([[13, 14], [13, 14]], np.int32)
  out, lse = DENSE.decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos_BT=jnp.asarray(q_pos),
                          kv_pos_BKC=jnp.asarray(pos), scale=0.25, window=6)
  perm = rng.permutation(c)  # shuffle slots: same keys, same positions, other order
  out2, lse2 = DENSE.decode(jnp.asarray(q), jnp.asarray(k[:, :, perm]), jnp.asarray(v[:, :, perm]),
                            q_pos_BT=jnp.asarray(q_pos), kv_pos_BKC=jnp.asarray(pos[:, :, perm]), scale=0.25, window=6)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse2), rtol=1e-6)
  ref, ref_lse = naive_attention(q, np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2), q_pos, pos[:, 0], 0.25, window=6)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-5)


def test_merge_attention_of_disjoint_key_sets_is_exact():
  rng = np.random.default_rng(3)
  b, t, h, d = 1, 6, 4, 8
  q, k, v = _qkv(rng, b, t, 10, h, h, d)
  q_pos = np.full((b, t), 20, np.int32)
  kv_pos = np.arange(10, dtype=np.int32)[None]
  full = DENSE.prefill(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos_BT=jnp.asarray(q_pos),
                       kv_pos_BS=jnp.asarray(kv_pos), scale=0.3)
  parts = []
  for sl in (slice(0, 3), slice(3, 10)):
    parts.append(DENSE.prefill(jnp.asarray(q), jnp.asarray(k[:, sl]), jnp.asarray(v[:, sl]),
                               q_pos_BT=jnp.asarray(q_pos), kv_pos_BS=jnp.asarray(kv_pos[:, sl]), scale=0.3))
  empty = DENSE.prefill(jnp.asarray(q), jnp.asarray(k[:, :2]), jnp.asarray(v[:, :2]), q_pos_BT=jnp.asarray(q_pos),
                        kv_pos_BS=jnp.full((1, 2), -1, jnp.int32), scale=0.3)  # sees nothing: lse = -inf
  out, lse = attention.merge_attention(parts + [empty])
  np.testing.assert_allclose(np.asarray(out), np.asarray(full[0]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(full[1]), rtol=1e-6)
  out0, lse0 = attention.merge_attention([empty, empty])
  assert np.all(np.asarray(out0) == 0) and np.all(np.isneginf(np.asarray(lse0)))


def test_registry_auto_and_errors():
  from helpers import tiny_config

  import jax

  cfg = tiny_config()
  on_gpu = jax.devices()[0].platform == "gpu"
  assert attention.resolve("auto", cfg, None, "prefill").name == ("cudnn" if on_gpu else "dense")
  assert attention.resolve("auto", cfg, None, "decode").name == "dense"
  with pytest.raises(ConfigError, match="available: auto, cudnn, dense"):
    attention.get("nope")
  with pytest.raises(ConfigError, match="cannot run decode: cuDNN flash attention serves prefill"):
    attention.resolve("cudnn", cfg, None, "decode")
  if not on_gpu:
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
      attention.resolve("cudnn", cfg, None, "prefill")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_matches_dense_reference_on_gpu(window):
  rng = np.random.default_rng(4)
  b, t, h, kh, d = 1, 512, 8, 2, 128
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(rng, b, t, t, h, kh, d))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cud = attention.get("cudnn")
  out, lse = cud.prefill(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, scale=d ** -0.5, window=window)
  ref, ref_lse = DENSE.prefill(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), q_pos_BT=pos,
                               kv_pos_BS=pos, scale=d ** -0.5, window=window)
  rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-2, rel
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=0.05)
  # a model layer drops lse: the inference kernel (no softmax statistics), same output
  fast, none = cud.prefill(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, scale=d ** -0.5, window=window, need_lse=False)
  assert none is None
  np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(out, np.float32), atol=2e-2)


def test_need_lse_false_is_accepted_by_every_method():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(x) for x in _qkv(rng, 1, 8, 8, 4, 2, 64))
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, 8))
  ref, _ = DENSE.prefill(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, scale=0.125)
  for name in attention.available():
    method = attention.get(name)
    if name == "flash":
      method = type(method)(interpret=True)
    elif name == "cudnn" and not any(dv.platform == "gpu" for dv in jax.devices()):
      continue
    out, _ = method.prefill(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, scale=0.125, need_lse=False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6, err_msg=name)
