"""Probe (Hopper): where a vertical-slash call's time goes outside the kernel. Per set at 128K, H = 32,
cumulative: the builder (`vertical_slash_to_ranges`), + the kernel's inputs (`flash_mgpu_inputs._ranges_inputs`:
canonical ranges, band, shared windows, column fields), + the gathered column K/V, and the whole call.
    PYTHONPATH=. python3 benchmarks/probes/vs_prep_probe.py [--blocks 56x64 128x128]"""
import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from kernels import vs_pattern, vs_ranges_builder  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu, flash_mgpu_inputs  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--sets", nargs="*", default=["1000,6096", "30,800", "3500,100", "100,800"])
ap.add_argument("--blocks", nargs="*", default=["56x64", "128x128"])
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--seq", type=int, default=131072)
args = ap.parse_args()
s, h, d = args.seq, 32, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
rng = np.random.default_rng(0)
print("| set | blocks | build ms | + inputs | + columns gathered | whole call |")
print("|---|---|---|---|---|---|")
for spec in args.sets:
  nv, ns = map(int, spec.split(","))
  vert, sl = vs_pattern(rng, s, h, nv, ns)
  vj, sj = jnp.asarray(vert), jnp.asarray(sl)
  for blocks in args.blocks:
    bq, bk = map(int, blocks.split("x"))
    build = vs_ranges_builder(s, nv, ns, bq, bk)
    split = bq == flash_mgpu.SPLIT_Q

    def inputs(q, k, vj, sj, gather):
      lay, cols = build(vj, sj)
      kp = flash_mgpu_inputs._pad_to(k, max(-(-s // bk) * bk, flash_mgpu.SHARED if split else 0), 1)
      meta, lo, hi, thr, colmap, srt = flash_mgpu_inputs._ranges_inputs(lay, cols, kp, t=s, s=s, h=h, block_k=bk,
                                                                 causal=True, split=split)
      out = (meta, lo, hi, thr, colmap)
      return out + ((flash_mgpu_inputs._gather_columns(kp, srt, h), flash_mgpu_inputs._gather_columns(kp, srt, h)) if gather else ())

    def whole(q, k, v, vj, sj):
      lay, cols = build(vj, sj)
      return flash_mgpu._run(q, k, v, lay, cols, scale=d ** -0.5, causal=True, block_k=bk, stages=2,
                             heads_fastest=True)[0]
    t = [bench(build, vj, sj, reps=args.reps)["ms"],
         bench(functools.partial(inputs, gather=False), q, k, vj, sj, reps=args.reps)["ms"],
         bench(functools.partial(inputs, gather=True), q, k, vj, sj, reps=args.reps)["ms"]]
    try:
      t.append(bench(whole, q, k, v, vj, sj, reps=args.reps)["ms"])
    except Exception as e:  # noqa: BLE001 (no Hopper GPU: the kernel does not run)
      t.append(float("nan"))
      print(f"whole call failed: {str(e).splitlines()[0][:120]}", flush=True)
    print(f"| ({nv}, {ns}) | {blocks} | " + " | ".join(f"{x:.2f}" for x in t) + " |", flush=True)
