"""Probe (H200): where the int4 Hopper decode's time goes at 128K (B=1, H=32, K=8), 8 calls per
executable (wall clock and the GPU's time from the profiler): the whole call (and the kernels XLA
launches for it) with the splits combined by the Pallas kernel or in XLA, the queries prepared in the kernel (q_direct) or in XLA, and the kernel
alone; the bf16 kernel's whole call. --residual: first the `residual` gpu test's
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


def kernel_count(fn, *args):
  """Kernels XLA launches for one call: fusions and custom calls in the optimized entry computation."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  entry = text[text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  return sum(1 for ln in entry.splitlines() if " fusion(" in ln or "custom-call(" in ln)


def parts():
  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, 128 * 1024)
  s = 128 ** -0.5
  t = lambda f, *a: bench_in_jit(f, *a, reps=20)  # noqa: E731  (8 calls per executable; wall clock and GPU time)
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  f = lambda *a: dec.decode_attention(*a, scale=s)[0]  # noqa: E731
  r = t(f, q, kb, vb, pos, qp)
  bf16 = r["ms"]
  bf16_dev = r.get("device_ms")
  print(f"bf16 flash-decode: whole call {bf16:.4f} ms (GPU {bf16_dev or 0:.4f}; one per dispatch {r['ms_dispatch']:.4f}), "
        f"{kernel_count(f, q, kb, vb, pos, qp)} kernels", flush=True)
  for knobs in (dict(), dict(fused_combine=False), dict(q_direct=False, fused_combine=False)):
    knobs = dict(dict(num_splits=49, num_stages=2), **knobs)
    g = mq.geometry(q, kq, scale=s, window=None, block_k=64, **knobs)
    f = lambda *a, g=g: mq._run(g, *a)[0]  # noqa: E731
    r = t(f, q, kq, vq, pos, qp)
    kern = t(lambda *a, g=g: mq._call(g, *a), *mq._prepare(g, q, qp), *mq._cache_args(g, kq, vq, pos))
    dev = r.get("device_ms") or 0.0
    print(f"parts {knobs} splits={g.splits}: whole {r['ms']:.4f} ms ({r['ms'] / bf16:.3f}x bf16; GPU {dev:.4f} ms = "
          f"{dev / (bf16_dev or 1):.3f}x; one per dispatch {r['ms_dispatch']:.4f}), {kernel_count(f, q, kq, vq, pos, qp)} "
          f"kernels | kernel alone {kern['ms']:.4f} ms (GPU {kern.get('device_ms') or 0:.4f})", flush=True)


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
