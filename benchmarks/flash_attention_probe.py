"""Probe: lcinfer's Pallas (Triton) flash-attention forward vs cuDNN, one shape, on a GPU.

B=1, H=32, K=8, D=128, S=8192, causal, bf16; median of 10 after warm-up.
TFLOP/s = 2*B*H*S^2*D / time (QK^T and PV, 2 FLOPs per MAC, half the square under causal).
Run: PYTHONPATH=. python3 benchmarks/flash_attention_probe.py   (the full kernels benchmark,
benchmarks/kernels.py with S = 8K/32K/128K, is issue 4's; see NOTES.md)
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcinfer.pallas_kernels.flash_triton import flash_attention

B, H, K, D, S = 1, 32, 8, 128, 8192
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (B, S, H, D), jnp.bfloat16)
k = jax.random.normal(ks[1], (B, S, K, D), jnp.bfloat16)
v = jax.random.normal(ks[2], (B, S, K, D), jnp.bfloat16)
fns = {"pallas_triton": jax.jit(lambda q, k, v: flash_attention(q, k, v, scale=D**-0.5, causal=True)[0]),
       "cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=D**-0.5, is_causal=True,
                                                                      implementation="cudnn"))}
flops = 2 * B * H * S * S * D
for name, f in fns.items():
  jax.block_until_ready(f(q, k, v))
  ts = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(q, k, v))
    ts.append(time.perf_counter() - t0)
  t = float(np.median(ts))
  print(f"{name}: {t * 1e3:.3f} ms  {flops / t / 1e12:.1f} TFLOP/s")
o1, o2 = (fns[n](q, k, v).astype(jnp.float32) for n in fns)
print("max |pallas - cudnn|:", float(jnp.max(jnp.abs(o1 - o2))))
