"""The far slashes of a vertical-slash set at 128K (H = 32) as exact diagonals, twice (the second
launch for ncu: --launch-skip 1), for profilers. Says whether the diagonals' L2 reads are at the
hardware's L2 throughput (the bound on (30, 800) and (100, 800): benchmarks/NOTES.md, sessions 20-21):
    python3 benchmarks/probes/diag_one_call.py [V,S] [PROGRAMS]"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import vs_pattern, vs_subset  # noqa: E402
from lcinfer.pallas_kernels.diagonals import diagonal_attention  # noqa: E402

nv, ns = map(int, (sys.argv[1] if len(sys.argv) > 1 else "30,800").split(","))
programs = int(sys.argv[2]) if len(sys.argv) > 2 else None
s, h, d = 131072, 32, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
_, sl = vs_subset(*vs_pattern(np.random.default_rng(0), s, h, nv, ns), "far")
f = jax.jit(lambda q, k, v, o: diagonal_attention(q, k, v, o, scale=d ** -0.5, programs=programs)[0])
for _ in range(2):
  f(q, k, v, jnp.asarray(sl)).block_until_ready()
print("done diagonals", nv, ns, programs)
