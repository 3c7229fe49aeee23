"""Probe (H100): the vertical-slash sets at 128K on the Mosaic GPU kernel (ranges + columns) under
kernel variants (grid order, stages, lazy maximum, block_k, narrow steps), on parts of each set
(`kernels.vs_subset`: without the far slashes, the band alone, the far slashes alone), and the
dense kernel at 128K under the same variants. Index construction included.
    PYTHONPATH=. python3 benchmarks/probes/vs_order_probe.py --variants hf,s2,lazy,k128,narrow ...
    PYTHONPATH=. python3 benchmarks/probes/vs_order_probe.py --parts all no-far band far"""
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from kernels import VS_PARTS, vs_pattern, vs_ranges_builder, vs_subset  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402
from vs_knobs import block_q, knobs  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--sets", nargs="*", default=["1000,6096", "30,800", "3500,100", "100,800"])
ap.add_argument("--parts", nargs="*", default=["all"], choices=VS_PARTS)
ap.add_argument("--variants", nargs="*", default=["hf,s2,lazy", "hf,s2,eager"],
                help="comma lists (vs_knobs.py): hf|tf, s<stages>, lazy|eager, k64|k128, narrow, q56")
ap.add_argument("--dense", action="store_true")
ap.add_argument("--check", action="store_true", help="max |out - out of the first variant| per set")
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()
s, h, d = 131072, 32, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
cudnn = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
              q, k, v, reps=args.reps)["ms"]
print(f"cudnn dense {cudnn:.2f} ms", flush=True)


if args.dense:
  for variant in args.variants:
    kw = knobs(variant)
    kw["block_k"] = 128
    f = jax.jit(lambda q, k, v, kw=kw: flash_mgpu._run(q, k, v, None, None, scale=d ** -0.5, causal=True,
                                                       **kw)[0])
    try:
      ms = bench(f, q, k, v, reps=args.reps)["ms"]
    except Exception as e:  # noqa: BLE001 (e.g. a variant over the shared-memory limit)
      print(f"dense 128K {variant:22s} failed: {str(e).splitlines()[0][:150]}", flush=True)
      continue
    print(f"dense 128K {variant:22s} {ms:7.2f} ms  {cudnn / ms:5.3f}x cudnn", flush=True)
rng = np.random.default_rng(0)
for spec in args.sets:
  nv, ns = map(int, spec.split(","))
  vert, sl = vs_pattern(rng, s, h, nv, ns)
  for part in args.parts:
    vv, ss = vs_subset(vert, sl, part)
    first = None
    for variant in args.variants:
      kw = knobs(variant)
      bk, bq = kw["block_k"], block_q(variant)
      build = vs_ranges_builder(s, vv.shape[-1], ns, bq, bk)

      def f(q, k, v, vj, sj, build=build, kw=kw):
        lay, cols = build(vj, sj)
        return flash_mgpu._run(q, k, v, lay, cols, scale=d ** -0.5, causal=True, **kw)[0]
      try:
        ms = bench(f, q, k, v, jnp.asarray(vv), jnp.asarray(ss), reps=args.reps)["ms"]
      except Exception as e:  # noqa: BLE001
        print(f"(v={nv}, s={ns}) {part:15s} {variant:14s} failed: {str(e).splitlines()[0][:150]}", flush=True)
        continue
      print(f"(v={nv}, s={ns}) {part:15s} {variant:14s} {ms:7.2f} ms  {cudnn / ms:5.2f}x cudnn", flush=True)
      if args.check:
        o = jax.jit(f)(q, k, v, jnp.asarray(vv), jnp.asarray(ss))
        if first is None:
          first = o
        else:
          err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - first.astype(jnp.float32))))
          print(f"(v={nv}, s={ns}) {part:15s} {variant:14s} check: max |out - first variant's| = {err:.3g}",
                flush=True)
        del o
