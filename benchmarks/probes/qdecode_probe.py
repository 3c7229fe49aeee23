"""Probe (not a benchmark): time the quantized flash-decoding kernel over configs, and give one
launch of a chosen cache kind for ncu.  --one int4|int8|bf16 runs 3 calls of it and exits."""
import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from lcinfer.pallas_kernels import quant  # noqa: E402
from lcinfer.pallas_kernels.decode import decode_attention  # noqa: E402
from lcinfer.pallas_kernels.decode_quant import quantized_decode_attention  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--one", default=None)
args = p.parse_args()
b, kh, h, c, d = 1, 8, 32, 131072, 128
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (b, 1, h, d)).astype(jnp.bfloat16)
k = jax.random.normal(ks[1], (b, kh, c, d)).astype(jnp.bfloat16)
v = jax.random.normal(ks[2], (b, kh, c, d)).astype(jnp.bfloat16)
pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, kh, c))
qp = jnp.full((b, 1), c - 1, jnp.int32)
caches = {}
for bits in (8, 4, 2):
  caches[f"int{bits}"] = (quant.quantize(k, bits=bits, axis="channel", group=64, scale_dtype=jnp.bfloat16),
                          quant.quantize(v, bits=bits, axis="token", group=d, scale_dtype=jnp.bfloat16))


def qfn(cfg):
  return jax.jit(lambda q, kq, vq, pos, qp: quantized_decode_attention(q, kq, vq, pos, qp, scale=d ** -0.5, **cfg)[0])


bf16 = jax.jit(lambda q, k, v, pos, qp: decode_attention(q, k, v, pos, qp, scale=d ** -0.5)[0])
if args.one:
  best = dict(num_splits=64, num_stages=3)
  f, a = (bf16, (q, k, v, pos, qp)) if args.one == "bf16" else (qfn(best), (q, *caches[args.one], pos, qp))
  for _ in range(3):
    jax.block_until_ready(f(*a))
  sys.exit(0)
print("bf16", round(bench(bf16, q, k, v, pos, qp, reps=20)["ms"], 4), flush=True)
for kind in ("int8", "int4", "int2"):
  print(kind, "default", round(bench(qfn({}), q, *caches[kind], pos, qp, reps=20)["ms"], 4), flush=True)
for cfg in (dict(_unpack="float", num_splits=64, num_stages=3), dict(_unpack="float", num_splits=128, num_stages=3),
            dict(num_splits=64, num_stages=3), dict(num_splits=128, num_stages=3), dict(num_splits=48, num_stages=3),
            dict(num_splits=96, num_stages=3), dict(num_splits=256, num_stages=3), dict(num_splits=64, num_stages=2),
            dict(num_splits=128, num_stages=2), dict(num_splits=128, num_stages=4)):
  try:
    ms = bench(qfn(cfg), q, *caches["int4"], pos, qp, reps=20)["ms"]
    print("int4", cfg, round(ms, 4), flush=True)
  except Exception as e:  # noqa: BLE001
    print("int4", cfg, "ERR", str(e)[:300], flush=True)
