"""One vertical-slash call at 128K (H=32, Mosaic GPU kernel) for profilers:
    python3 benchmarks/probes/vs_one_call.py V,S [all|no-far|band|far] [VARIANT]
part: kernels.vs_subset; VARIANT: a vs_knobs comma list (default: 128x64, heads fastest)."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import vs_pattern, vs_ranges_builder, vs_subset  # noqa: E402
from vs_knobs import block_q, knobs  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402

nv, ns = map(int, sys.argv[1].split(","))
part = sys.argv[2] if len(sys.argv) > 2 else "all"
variant = sys.argv[3] if len(sys.argv) > 3 else "hf"
kw, bq = knobs(variant), block_q(variant)
bk = kw["block_k"]
s, h, d = 131072, 32, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
vert, sl = vs_subset(*vs_pattern(np.random.default_rng(0), s, h, nv, ns), part)
lay, cols = jax.jit(vs_ranges_builder(s, vert.shape[-1], ns, bq, bk))(jnp.asarray(vert), jnp.asarray(sl))
f = jax.jit(lambda q, k, v, lay, cols: flash_mgpu._run(q, k, v, lay, cols, scale=d ** -0.5, causal=True, **kw)[0])
for _ in range(2):
  f(q, k, v, lay, cols).block_until_ready()
print("done", part, nv, ns, variant)
