"""Probe (H200): where the int4 Hopper decode's time goes at 128K (B=1, H=32, K=8), 8 calls per
executable: the whole call (and the kernels XLA launches for it) with the split combination in one
pass or two, with the queries prepared in XLA or in the kernel (q_direct), for a few grids, and the
kernel alone; the bf16 kernel with either combination. --residual: first the `residual` gpu test's
case at several split counts (output error against the oracle), to tell rounding from a bug.
    PYTHONPATH=. python3 benchmarks/probes/qdecode_parts_probe.py [--residual]"""
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
from lcinfer.pallas_kernels import decode as dec  # noqa: E402
from lcinfer.pallas_kernels.decode_quant import quantized_decode_reference  # noqa: E402


def combine_two_pass(o_BKSRD, lse_BKSR, rows):
  """The combination before session 11 (a max pass, then the weighted sums), for comparison."""
  o_BKSRD, lse_BKSR = o_BKSRD[:, :, :, :rows], lse_BKSR[:, :, :, :rows]
  m = jnp.max(lse_BKSR, axis=2, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_BKSR - m)
  den = jnp.sum(w, axis=2)
  empty = den == 0
  den_safe = jnp.where(empty, 1.0, den)
  out = jnp.sum(w[..., None] * o_BKSRD, axis=2) / den_safe[..., None]
  return out, jnp.where(empty, -jnp.inf, m[:, :, 0] + jnp.log(den_safe))


def kernel_count(fn, *args):
  """Kernels XLA launches for one call: fusions and custom calls in the optimized entry computation."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  entry = text[text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  return sum(1 for ln in entry.splitlines() if " fusion(" in ln or "custom-call(" in ln or " fusion." in ln.split("=")[0])


def with_combine(combine, fn):
  """fn traced with `combine` as the split combination of both decode kernels' wrappers."""
  def run(*a):
    saved = mq.combine_splits, dec.combine_splits
    mq.combine_splits = dec.combine_splits = combine
    try:
      return fn(*a)
    finally:
      mq.combine_splits, dec.combine_splits = saved
  return run


def parts():
  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, 128 * 1024)
  s = 128 ** -0.5
  t = lambda f, *a: bench_in_jit(f, *a, reps=20)  # noqa: E731  (8 calls per executable: GPU time)
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  bf16 = {}
  for name, comb in (("one-pass", dec.combine_splits), ("two-pass", combine_two_pass)):
    f = with_combine(comb, lambda *a: dec._decode.__wrapped__(*a, **dec_knobs(s))[0])
    r = t(f, q, kb, vb, pos, qp)
    bf16[name] = r["ms"]
    print(f"bf16 flash-decode combine={name}: whole call {r['ms']:.4f} ms (one per dispatch {r['ms_dispatch']:.4f}),"
          f" {kernel_count(f, q, kb, vb, pos, qp)} kernels", flush=True)
  ref = bf16["one-pass"]
  for knobs in (dict(num_splits=49, q_direct=False), dict(num_splits=49, q_direct=True),
                dict(num_splits=64, q_direct=True), dict(num_splits=49, q_direct=True, num_stages=3)):
    knobs = dict(dict(num_stages=2), **knobs)
    g = mq.geometry(q, kq, scale=s, window=None, block_k=64, **knobs)
    for name, comb in (("one-pass", dec.combine_splits), ("two-pass", combine_two_pass)):
      f = with_combine(comb, lambda *a: mq._run.__wrapped__(g, *a)[0])
      r = t(f, q, kq, vq, pos, qp)
      print(f"parts {knobs} combine={name} splits={g.splits}: whole {r['ms']:.4f} ms ({r['ms'] / ref:.3f}x bf16 "
            f"one-pass; one per dispatch {r['ms_dispatch']:.4f}), {kernel_count(f, q, kq, vq, pos, qp)} kernels",
            flush=True)
    q2, qpos = mq._prepare(g, q, qp)
    kern = t(lambda *a: mq._call(g, *a), q2, qpos, *mq._cache_args(kq, vq, pos))["ms"]
    print(f"parts {knobs} kernel alone {kern:.4f} ms ({kern / ref:.3f}x)", flush=True)


def dec_knobs(s):
  """`decode._decode`'s static knobs as `decode_attention` picks them on this GPU (128K, K = 8)."""
  splits, bk, warps, stages = dec.pick_config(dec.gpu_device(), 1, 8, 128 * 1024, 128)
  return dict(scale=s, window=None, num_splits=splits, block_k=bk, num_warps=warps, num_stages=stages,
              interpret=False, poison=None)


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
  if "--residual" in sys.argv:
    residual_case()
  parts()
