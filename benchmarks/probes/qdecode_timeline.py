"""Probe (H200, under ncu): the kernels of one int4 Hopper decode call and of one bf16 decode call at
128K (B=1, H=32, K=8), each GPU time on its own (ncu serializes launches: no gaps shown). Argument:
executions of each executable (default 20; 2 under ncu), printed between markers.
    ncu --metrics gpu__time_duration.sum --csv python3 benchmarks/probes/qdecode_timeline.py 2"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qdecode_mgpu_probe import inputs  # noqa: E402
from lcinfer.pallas_kernels.decode import decode_attention  # noqa: E402
from lcinfer.pallas_kernels import dispatch  # noqa: E402
import lcinfer.pallas_kernels.decode_quant_mgpu  # noqa: E402,F401  (registers the Hopper kernel)

q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, 128 * 1024)
s = 128 ** -0.5
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
for name, fn, args in (("int4", lambda *a: dispatch.call("quantized_decode_attention", None, *a, scale=s)[0], (q, kq, vq, pos, qp)),
                       ("bf16", lambda *a: decode_attention(*a, scale=s)[0],
                        (q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), pos, qp))):
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  print(f"== {name} start", flush=True)
  for _ in range(reps):
    jax.block_until_ready(f(*args))
  print(f"== {name} end", flush=True)
