"""Probe (H100): block-sparse with 10% of the causal blocks kept at 128K (as benchmarks/kernels.py
draws it) on the Mosaic GPU kernel, lazy maximum on and off, two rounds in turn.
    PYTHONPATH=. python3 benchmarks/probes/bs_lazy_probe.py"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402
from lcinfer.pallas_kernels.sparse_index import blocks_from_mask  # noqa: E402

s, h, d = 131072, 32, 128
ks = jax.random.split(jax.random.key(11), 4)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[:3])
for bq, bk in ((128, 128), (128, 64)):
  nq, nk = s // bq, s // bk
  qb, kb = jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]
  causal = kb * bk <= qb * bq + bq - 1
  diag = causal & (kb * bk + bk - 1 >= qb * bq)
  keep = (jax.random.uniform(ks[3], (1, h, nq, nk)) < 0.10) & causal | diag
  layout = blocks_from_mask(keep, int(jnp.max(jnp.sum(keep, -1))), block_q=bq, block_k=bk)
  for rnd in range(2):
    for lazy in (True, False):
      f = jax.jit(lambda q, k, v, lay, lazy=lazy, bk=bk: flash_mgpu._run(
          q, k, v, lay, None, scale=d ** -0.5, causal=True, block_k=bk, stages=2, heads_fastest=True,
          lazy_max=lazy)[0])
      print(f"{bq}x{bk} round {rnd} lazy={lazy}: {bench(f, q, k, v, layout, reps=5)['ms']:.2f} ms", flush=True)
