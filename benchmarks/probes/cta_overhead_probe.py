"""Probe (Hopper): the Hopper kernel's cost per CTA outside its steps, measured directly. Every query
block lists the same number c of whole (unmasked) block_k-key ranges below its first row, a block apart (fewer
near the start), c = 0, 1, 2, 4, 8, 16; a line through ms(c) gives the cost of one step per SM and,
at c = 0, the prologue / epilogue of the CTAs (Q load, meta reads, output store) with no step.
    PYTHONPATH=. python3 benchmarks/probes/cta_overhead_probe.py [--seq 131072] [--counts 0 1 2 4 8 16]"""
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402
from lcinfer.pallas_kernels.vertical_slash import KeyRanges  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seq", type=int, default=131072)
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--counts", type=int, nargs="*", default=[0, 1, 2, 4, 8, 16])
ap.add_argument("--modes", nargs="*", default=["128x128", "56x64"])
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()
s, h, d = args.seq, args.heads, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
n_sm = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132


def layout(bq, bk, c):
  nq = -(-s // bq)
  q0 = np.arange(nq)[:, None] * bq
  e = np.arange(max(c, 1))[None, :]
  lo = q0 - (2 * e + 1) * bk   # apart: no run of touching ranges (split mode would share its windows)
  ok = (lo >= 0) & (e < c)
  count = ok.sum(-1).astype(np.int32)
  lo = np.where(ok, lo, 0).astype(np.int32)
  hi = np.where(ok, lo + bk, 0).astype(np.int32)
  bc = lambda x: jnp.asarray(np.broadcast_to(x, (1, h) + x.shape))  # noqa: E731
  return KeyRanges(count=bc(count), start=bc(lo), end=bc(hi), block_q=bq, block_k=bk), nq


print("| mode | c | ms | CTAs | us per CTA-slot |", flush=True)
print("|---|---|---|---|---|", flush=True)
for mode in args.modes:
  bq, bk = map(int, mode.split("x"))
  pts = []
  for c in args.counts:
    lay, nq = layout(bq, bk, c)
    n_cta = (nq // 2 if bq == flash_mgpu.SPLIT_Q else nq) * h
    f = jax.jit(lambda q, k, v, lay, bk=bk: flash_mgpu._run(q, k, v, lay, None, scale=d ** -0.5, causal=True,
                                                            block_k=bk, stages=2, heads_fastest=True)[0])
    ms = bench(f, q, k, v, lay, reps=args.reps)["ms"]
    pts.append((c, ms))
    print(f"| {mode} | {c} | {ms:.3f} | {n_cta} | {ms * 1e3 * n_sm / n_cta:.2f} |", flush=True)
  if len(pts) >= 2:
    cs, ts = np.array(pts).T
    slope, icpt = np.polyfit(cs, ts, 1)
    print(f"fit {mode}: {slope * 1e3 * n_sm / n_cta:.3f} us per step per SM, "
          f"{icpt * 1e3 * n_sm / n_cta:.2f} us per CTA at c=0 ({n_sm} SMs; index inputs included)", flush=True)
