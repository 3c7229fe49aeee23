"""Probe (H200): the host's time to enqueue an executable, beside its GPU time, for the decode calls at
128K (B=1, H=32, K=8) and for Mosaic GPU kernels that differ only in their count of TMA descriptors.

Why: in session 15 the int4 Hopper call's wall clock (8 calls per executable) read ~8 us per call
above its GPU time (0.056 against 0.047 ms), and one call per dispatch 0.055 ms: the executions
look host-bound. Mosaic GPU encodes every TMA descriptor on the host at each launch (its scratch's
`host_init`; the int4 kernel has 10), so the `tma` rows ask what one descriptor costs the host.

Host time: a loop enqueues N executions without waiting (jax dispatches asynchronously), timed per
execution, median of 5 loops; then one sync. Where it exceeds the GPU time per execution, the wall
clock measures the host. GPU time: the profiler's timeline (`kernel_report.device_time`).
    PYTHONPATH=. python3 benchmarks/probes/host_dispatch_probe.py [--n 200]"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_report import device_time, prepare_in_jit  # noqa: E402
from qdecode_mgpu_probe import inputs  # noqa: E402
from lcinfer.pallas_kernels import decode as dec  # noqa: E402
from lcinfer.pallas_kernels import decode_quant_mgpu as mq  # noqa: E402
from lcinfer.pallas_kernels import mgpu_inline as mi  # noqa: E402


def host_us(compiled, args, n: int) -> float:
  """Median over 5 loops of the host's microseconds to enqueue one execution."""
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(5):
    t = time.perf_counter()
    outs = [compiled(*args) for _ in range(n)]
    ts.append((time.perf_counter() - t) / n)
    jax.block_until_ready(outs)
  return statistics.median(ts) * 1e6


def tma_kernel(n_in: int):
  """A Mosaic GPU kernel with n_in + 1 TMA descriptors and almost no GPU work: n_in [64, 128] bf16
  inputs copied into shared memory on one barrier, the first copied out."""
  plgpu = mi.plgpu()

  def body(*refs):
    ins, out_ref, bufs, bar = refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2]
    for i, ref in enumerate(ins):
      plgpu.copy_gmem_to_smem(ref, bufs.at[i], bar)
    plgpu.barrier_wait(bar)
    plgpu.copy_smem_to_gmem(bufs.at[0], out_ref)
    plgpu.wait_smem_to_gmem(0)

  scratch = (plgpu.SMEM((n_in, 64, 128), jnp.bfloat16, transforms=mi.tiled(128, jnp.bfloat16)),
             plgpu.Barrier(num_arrivals=n_in))
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 128), jnp.bfloat16), scratch_types=scratch,
                      kernel_name=f"lcinfer_tma_probe_{n_in}")


def decode_calls(c: int = 128 * 1024) -> dict:
  """{'int4': (fn, args), 'bf16': (fn, args)}: the decode benchmark's two calls at B=1, H=32, K=8
  (int4: the Hopper call over a KIVI cache; bf16: flash-decoding), each returning its output."""
  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, c)
  s = 128 ** -0.5
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  return {"int4": (lambda *a: mq.quantized_decode_attention_mgpu(*a, scale=s)[0], (q, kq, vq, pos, qp)),
          "bf16": (lambda *a: dec.decode_attention(*a, scale=s)[0], (q, kb, vb, pos, qp))}


def row(name, fn, args, n, copies=1):
  compiled, cargs, _, _ = prepare_in_jit(fn, *args, copies=copies)
  host = host_us(compiled, cargs, n)
  dev = device_time(compiled, cargs, copies)
  dev_us = dev * 1e3 * copies if dev is not None else float("nan")
  print(f"host {name:44s} x{copies}: host {host:8.1f} us, GPU {dev_us:8.1f} us per execution "
        f"({'host' if host > dev_us else 'GPU'}-bound)")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=200, help="executions enqueued per timed loop")
  args = ap.parse_args()
  for n_in in (1, 2, 5, 10):
    xs = [jnp.full((64, 128), i, jnp.bfloat16) for i in range(n_in)]
    row(f"tma kernel, {n_in + 1} descriptors", tma_kernel(n_in), xs, args.n)
  calls = decode_calls()
  q, kq, vq, pos, qp = calls["int4"][1]
  g = mq.geometry(q, kq, scale=128 ** -0.5, window=None, num_splits=49, block_k=64, num_stages=2)
  kernel = lambda *a: mq._call(g, *a)  # noqa: E731
  kernel_args = (*mq._prepare(g, q, qp), *mq._cache_args(g, kq, vq, pos))
  for copies in (1, 8):
    row("bf16 decode call", *calls["bf16"], args.n, copies)
    row("int4 Hopper decode call", *calls["int4"], args.n, copies)
    row("int4 Hopper kernel alone (10 descriptors)", kernel, kernel_args, args.n, copies)


if __name__ == "__main__":
  main()
