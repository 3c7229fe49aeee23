"""Probe (H200): where the int4 Hopper decode's time goes at 128K (B=1, H=32, K=8): the whole call
against its parts (query preparation, the kernel alone, the lse combination), for a few grids; then
the `residual` gpu test's case at several split counts (output error against the oracle, as
`assert_matches_oracle` measures it), to tell rounding from a bug.
    PYTHONPATH=. python3 benchmarks/probes/qdecode_parts_probe.py"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from kernel_report import bench_in_jit  # noqa: E402
from qdecode_mgpu_probe import inputs  # noqa: E402
from lcinfer.pallas_kernels import decode_quant_mgpu as mq  # noqa: E402
from lcinfer.pallas_kernels.decode import decode_attention  # noqa: E402
from lcinfer.pallas_kernels.decode_quant import quantized_decode_reference  # noqa: E402


def parts():
  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, 128 * 1024)
  s = 128 ** -0.5
  t = lambda f, *a: bench_in_jit(f, *a, reps=20)  # noqa: E731  (8 calls per executable: GPU time)
  r = t(lambda *a: decode_attention(*a, scale=s)[0], q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), pos, qp)
  bf16 = r["ms"]
  print(f"bf16 flash-decode whole call {bf16:.4f} ms (one call per dispatch {r['ms_dispatch']:.4f})")
  for knobs in (dict(num_splits=49, num_stages=2), dict(num_splits=49, num_stages=2, async_pv=True),
                dict(num_splits=49, num_stages=2, q_direct=True),
                dict(num_splits=49, num_stages=2, async_pv=True, q_direct=True),
                dict(num_splits=48, num_stages=2, consumers=3),
                dict(num_splits=48, num_stages=2, consumers=3, async_pv=True, q_direct=True)):
    g = mq.geometry(q, kq, scale=s, window=None, block_k=64, **knobs)
    r = t(lambda *a: mq._run(g, *a)[0], q, kq, vq, pos, qp)
    whole = r["ms"]
    pre = t(lambda q, qp: mq._prepare(g, q, qp), q, qp)["ms"]
    q2, qpos = mq._prepare(g, q, qp)
    cache = mq._cache_args(kq, vq, pos)
    kern = t(lambda *a: mq._call(g, *a), q2, qpos, *cache)["ms"]
    o_part, lse_part = jax.jit(lambda *a: mq._call(g, *a))(q2, qpos, *cache)
    post = t(lambda o, l: mq._finish(g, o, l, 1, jnp.bfloat16), o_part, lse_part)["ms"]
    print(f"parts {knobs} splits={g.splits}: whole {whole:.4f} ms ({whole / bf16:.3f}x bf16; one call per dispatch"
          f" {r['ms_dispatch']:.4f}) | prepare {pre:.4f} | kernel {kern:.4f} ({kern / bf16:.3f}x) | finish {post:.4f}",
          flush=True)


def residual_case():
  from test_decode_quant_mgpu import _inputs
  b, t, h, kh, c = 1, 3, 16, 4, 512
  q, k_q, v_q, pos, q_pos = _inputs(b, t, h, kh, c, seed=zlib_seed("residual"), holes=True)
  n, rng = 40, np.random.default_rng(7)
  rk, rv = (jnp.asarray(rng.standard_normal((b, kh, n, 128)), jnp.bfloat16) for _ in range(2))
  rp = jnp.asarray(np.tile(np.arange(c, c + n, dtype=np.int32), (b, kh, 1)))
  q_pos = q_pos + n
  ref, _ = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=128 ** -0.5, residual=(rk, rv, rp))
  ref = np.asarray(ref, np.float32)
  for sub, splits in ((1, 8), (1, 4), (2, 4), (1, 2), (2, 2), (1, 1)):
    out, _ = mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=128 ** -0.5, window=None, residual=(rk, rv, rp),
                              num_splits=splits, block_k=64, num_stages=2, sub=sub)
    out = np.asarray(out, np.float32)
    rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    print(f"residual sub={sub} splits={splits}: out rel err {rel:.3e}", flush=True)


def zlib_seed(name):
  import zlib
  return zlib.crc32(name.encode())


if __name__ == "__main__":
  residual_case()
  parts()
