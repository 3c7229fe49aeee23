"""Probe: lcinfer's Pallas flash-decoding vs the dense XLA decode over a 128K bf16 cache, on a GPU.

B=1, K=8, H=32, D=128, T=1; GB/s = K+V bytes read / time. Not yet run (issue 4; see NOTES.md).
Run: PYTHONPATH=. python3 benchmarks/flash_decode_probe.py
"""
import time

import jax
import jax.numpy as jnp

from lcinfer.attention.dense import DENSE
from lcinfer.pallas_kernels.decode import decode_attention

B, K, H, C, D, T = 1, 8, 32, 131072, 128, 1
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
k = jax.random.normal(ks[1], (B, K, C, D), jnp.bfloat16)
v = jax.random.normal(ks[2], (B, K, C, D), jnp.bfloat16)
pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, K, C))
qp = jnp.full((B, T), C - 1, jnp.int32)
fns = {"flash_decode": jax.jit(lambda *a: decode_attention(*a, scale=D ** -0.5)),
       "dense_xla": jax.jit(lambda q, k, v, p, qp: DENSE.decode(q, k, v, q_pos_BT=qp, kv_pos_BKC=p, scale=D ** -0.5))}


def bench(f, n=50):
  jax.block_until_ready(f(q, k, v, pos, qp))
  t = time.perf_counter()
  for _ in range(n):
    r = f(q, k, v, pos, qp)
  jax.block_until_ready(r)
  return (time.perf_counter() - t) / n


for name, f in fns.items():
  s = bench(f)
  print(f"{name}: {s * 1e6:.1f} us  {2 * B * K * C * D * 2 / s / 1e9:.0f} GB/s")
