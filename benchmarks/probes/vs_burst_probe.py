"""Probe (Hopper): the fixed cost of one timed sample (dispatch before it, sync after it) beside
the cost per call, for a vertical-slash call and for cuDNN dense at 128K (H=32), from samples of
1, 2, 4 and 8 back-to-back calls (`kernel_report.sample`, median of REPS each) fitted as
seconds = overhead + n * per_call. The benchmark's samples are ~100 ms bursts: 2 calls of
(1000, 6096) and 1 of cuDNN dense, so a fixed cost would weigh ~2.5x more per call on the sparse
row. H200, session 19: no fixed cost (fits of -0.5 / +0.05 / -5.7 ms); the time per call grows with
the burst instead ((1000, 6096) 42.10 -> 42.47 ms, cuDNN dense 245.6 -> 252.2 ms from 1 to 8 calls).
    PYTHONPATH=. python3 benchmarks/probes/vs_burst_probe.py [--sets 1000,6096 ...]"""
import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import rand, sample  # noqa: E402
from kernels import vs_pattern, vs_ranges_builder  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402

BURSTS = (1, 2, 4, 8)
REPS = 7


def fit(compiled, args):
  """(overhead ms, per-call ms, {burst: median ms per sample}) of compiled(*args)."""
  jax.block_until_ready(compiled(*args))
  per = {n: statistics.median(sample(compiled, args, n) * n for _ in range(REPS)) * 1e3 for n in BURSTS}
  slope, icept = np.polyfit(np.array(BURSTS, float), np.array([per[n] for n in BURSTS]), 1)
  return icept, slope, per


def report(name, compiled, args):
  icept, slope, per = fit(compiled, args)
  print(f"vsburst {name}: per call {slope:.3f} ms, fixed per sample {icept:.3f} ms; samples "
        + ", ".join(f"{n}: {ms:.2f}" for n, ms in per.items()), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sets", nargs="*", default=["1000,6096", "30,800"])
  a = ap.parse_args()
  s, h, d = 131072, 32, 128
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (rand(kk, (1, s, h, d)) for kk in ks)
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=d ** -0.5, is_causal=True,
                                                                implementation="cudnn"))
  report("cudnn dense", dense.lower(q, k, v).compile(), (q, k, v))
  rng = np.random.default_rng(0)
  for spec in a.sets:
    nv, ns = map(int, spec.split(","))
    vj, sj = (jnp.asarray(x) for x in vs_pattern(rng, s, h, nv, ns))
    build = vs_ranges_builder(s, nv, ns, flash_mgpu.SPLIT_Q, 64)

    def call(q, k, v, vj, sj, build=build):
      lay, cols = build(vj, sj)
      return flash_mgpu.block_sparse_attention_mgpu(q, k, v, lay, scale=d ** -0.5, columns=cols)[0]
    report(f"({nv}, {ns})", jax.jit(call).lower(q, k, v, vj, sj).compile(), (q, k, v, vj, sj))


if __name__ == "__main__":
  main()
