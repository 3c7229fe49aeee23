"""Probe (H100): block-sparse with 10% of the causal blocks kept at 128K (the benchmark's layout,
`kernels.bs_layout`) on the Mosaic GPU kernel, lazy maximum on and off, two rounds in turn.
    PYTHONPATH=. python3 benchmarks/probes/bs_lazy_probe.py"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from kernels import bs_layout  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402

s, h, d = 131072, 32, 128
ks = jax.random.split(jax.random.key(11), 4)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[:3])
for bq, bk in ((128, 128), (128, 64)):
  layout, _ = bs_layout(ks[3], s, h, bq, bk, 0.10)
  for rnd in range(2):
    for lazy in (True, False):
      f = jax.jit(lambda q, k, v, lay, lazy=lazy, bk=bk: flash_mgpu._run(
          q, k, v, lay, None, scale=d ** -0.5, causal=True, block_k=bk, stages=2, heads_fastest=True,
          lazy_max=lazy)[0])
      print(f"{bq}x{bk} round {rnd} lazy={lazy}: {bench(f, q, k, v, layout, reps=5)['ms']:.2f} ms", flush=True)
