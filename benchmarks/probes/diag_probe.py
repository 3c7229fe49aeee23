"""Probe (Hopper): the far slashes of a BENCHMARKS.md vertical-slash set at 128K (H = 32) as exact
diagonals (`diagonals.diagonal_attention`, Triton) under its knobs (block_q, num_warps,
diagonals_per_step, num_stages, heads_first, programs: a persistent launch on that many CTAs, i.e.
the L2 rate a subset of the SMs can pull; "d" after the knobs: offsets walked descending), beside
the same slashes as ranges on the split-mode Hopper kernel (the far part of `kernels.vs_subset`,
first column included in both). Prints ms and the rate of the K/V rows
the diagonals must read (one 256-byte K row and one V row per query row per slash, a lower bound
on their L2 reads), which says whether the exact mode is bound by L2 bandwidth (NOTES, session 19).
    PYTHONPATH=. python3 benchmarks/probes/diag_probe.py [--set 30,800] [--knobs 64,8,2,3,0 64,8,2,3,0,32 ...]"""
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench, rand  # noqa: E402
from kernels import vs_pattern, vs_ranges_builder, vs_subset  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402
from lcinfer.pallas_kernels.diagonals import diagonal_attention  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--set", default="30,800")
  ap.add_argument("--knobs", nargs="*", default=["64,8,2,3,0", "64,8,2,3,0d", "32,4,2,2,0", "32,4,2,2,0d",
                                                   "64,8,2,3,0,32", "64,8,2,3,0,32d", "64,8,2,3,0,132"],
                  help="block_q,num_warps,diagonals_per_step,num_stages,heads_first (0/1)[,programs: persistent]"
                       "[d: offsets descending]")
  ap.add_argument("--reps", type=int, default=5)
  a = ap.parse_args()
  s, h, d = 131072, 32, 128
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (rand(kk, (1, s, h, d)) for kk in ks)
  nv, ns = map(int, a.set.split(","))
  vert, sl = vs_subset(*vs_pattern(np.random.default_rng(0), s, h, nv, ns), "far")
  offs = jnp.asarray(sl)
  rows = float(np.sum(np.maximum(s - sl[0].astype(np.int64), 0)))            # (row, slash) pairs, all heads
  gbytes = rows * 2 * d * 2 / 1e9
  print(f"diag far slashes of {a.set}: {sl.shape[-1]} a head, {gbytes:.1f} GB of K/V rows at one per pair", flush=True)
  build = vs_ranges_builder(s, nv, ns, flash_mgpu.SPLIT_Q, 64)

  def ranges(q, k, v, vj, sj):
    lay, cols = build(vj, sj)
    return flash_mgpu.block_sparse_attention_mgpu(q, k, v, lay, scale=d ** -0.5, columns=cols)[0]
  ms = bench(ranges, q, k, v, jnp.asarray(vert), offs, reps=a.reps)["ms"]
  print(f"diag ranges mosaic_gpu 56x64 (far part): {ms:7.2f} ms", flush=True)
  for spec in a.knobs:
    desc = spec.endswith("d")
    bq, warps, per_step, stages, heads, *programs = map(int, spec.rstrip("d").split(","))
    programs = programs[0] if programs else None
    name = (f"bq={bq} warps={warps} per_step={per_step} stages={stages} heads_first={heads} programs={programs}"
            f" descending={int(desc)}")

    def diag(q, k, v, o, bq=bq, warps=warps, per_step=per_step, stages=stages, heads=heads, programs=programs,
             desc=desc):
      return diagonal_attention(q, k, v, o, scale=d ** -0.5, block_q=bq, num_warps=warps, num_stages=stages,
                                diagonals_per_step=per_step, heads_first=bool(heads), programs=programs,
                                descending=desc)[0]
    try:
      ms = bench(diag, q, k, v, offs, reps=a.reps)["ms"]
    except Exception as e:  # noqa: BLE001 (a knob Triton cannot compile)
      print(f"diag exact {name}: failed: {str(e).splitlines()[0][:150]}", flush=True)
      continue
    print(f"diag exact {name}: {ms:7.2f} ms, {gbytes / ms:5.2f} TB/s of K/V rows", flush=True)


if __name__ == "__main__":
  main()
