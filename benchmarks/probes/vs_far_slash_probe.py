"""Probe (H100): how much of a vertical-slash set's time the 50 far slashes take. Times the Mosaic GPU
kernel (ranges + columns, 128x64) at 128K on a set as BENCHMARKS.md draws it, then with the far
slashes dropped (band + verticals), the band with one vertical, then the far slashes alone (+ the first
column, so no row is empty).
    PYTHONPATH=. python3 benchmarks/probes/vs_far_slash_probe.py"""
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from kernels import vs_list_sizes, vs_pattern  # noqa: E402
from lcinfer.pallas_kernels.flash_mgpu import block_sparse_attention_mgpu  # noqa: E402
from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges  # noqa: E402

s, h, d = 131072, 32, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
dense = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
              q, k, v, reps=5)["ms"]
print(f"cudnn dense {dense:.2f} ms", flush=True)
rng = np.random.default_rng(0)
for nv, ns in ((30, 800), (100, 800), (1000, 6096)):
  vert, sl = vs_pattern(rng, s, h, nv, ns)
  near = ns - 50
  for name, vv, ss in (("all", vert, sl), ("no far slashes", vert, sl[..., :near]),
                       ("band, one vertical", vert[..., :1], sl[..., :near]),
                       ("far slashes only", vert[..., :1], sl[..., near:])):
    build = functools.partial(vertical_slash_to_ranges, seq_len=s, block_q=128, block_k=64,
                              max_ranges=vs_list_sizes(ns, 128, 64)[0],  # enough for every subset
                              max_cols=max(32, -(-vv.shape[-1] // 32) * 32))

    def f(q, k, v, vj, sj, build=build):
      lay, cols = build(vj, sj)
      return block_sparse_attention_mgpu(q, k, v, lay, scale=d ** -0.5, columns=cols)[0]
    ms = bench(f, q, k, v, jnp.asarray(vv), jnp.asarray(ss), reps=5)["ms"]
    print(f"(v={nv}, s={ns}) {name:18s} {ms:7.2f} ms  {dense / ms:5.1f}x cudnn", flush=True)
