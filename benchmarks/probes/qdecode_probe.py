"""Probe (not a benchmark): launch the quantized flash-decoding kernel (int4 / int8 / int2, KIVI
layout, 128K, default config), the Mosaic GPU int4 one (mgpu [num_splits=N num_stages=S lazy_max=0|1 sub=1|2
q_direct=0|1]) or the
bf16 one three times, for ncu to profile one launch.
    ncu --clock-control none -k regex:decode --launch-count 1 python3 benchmarks/probes/qdecode_probe.py int4
The config sweep is `benchmarks/kernels.py --tune` (run_quant_tune)."""
import sys

import jax
import jax.numpy as jnp

from lcinfer.pallas_kernels import quant
from lcinfer.pallas_kernels.decode import decode_attention
from lcinfer.pallas_kernels.decode_quant import quantized_decode_attention

kind = sys.argv[1] if len(sys.argv) > 1 else "int4"
b, kh, h, c, d = 1, 8, 32, 131072, 128
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (b, 1, h, d)).astype(jnp.bfloat16)
k, v = (jax.random.normal(kk, (b, kh, c, d)).astype(jnp.bfloat16) for kk in ks[1:])
pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, kh, c))
qp = jnp.full((b, 1), c - 1, jnp.int32)
if kind == "mgpu":  # the Mosaic GPU int4 kernel
  from lcinfer.pallas_kernels.decode_quant_mgpu import _dispatch_run
  k = quant.quantize(k, bits=4, axis="channel", group=64, scale_dtype=jnp.bfloat16)
  v = quant.quantize(v, bits=4, axis="token", group=d, scale_dtype=jnp.bfloat16)
  cfg = dict(num_splits=49, num_stages=2)   # knobs as key=int, e.g. num_splits=49 narrow=0 overlap=1
  cfg.update({key: int(val) for key, val in (a.split("=") for a in sys.argv[2:])})
  cfg = {key: bool(val) if key in ("lazy_max", "q_direct") else val for key, val in cfg.items()}
  f = jax.jit(lambda q, k, v, pos, qp: _dispatch_run(q, k, v, pos, qp, scale=d ** -0.5, window=None, residual=None,
                                                     block_k=64, **cfg)[0])
elif kind == "bf16":
  f = jax.jit(lambda q, k, v, pos, qp: decode_attention(q, k, v, pos, qp, scale=d ** -0.5)[0])
else:
  bits = int(kind[3:])
  k = quant.quantize(k, bits=bits, axis="channel", group=64, scale_dtype=jnp.bfloat16)
  v = quant.quantize(v, bits=bits, axis="token", group=d, scale_dtype=jnp.bfloat16)
  f = jax.jit(lambda q, k, v, pos, qp: quantized_decode_attention(q, k, v, pos, qp, scale=d ** -0.5)[0])
for _ in range(3):
  jax.block_until_ready(f(q, k, v, pos, qp))
