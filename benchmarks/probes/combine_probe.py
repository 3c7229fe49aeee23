"""Probe (H200): the split-combination kernel's GPU time per (channels per program, warps) at the
128K decode benchmark's shapes (B = 1, H = 32, K = 8, D = 128): the int4 Hopper kernel's O^T
partials (49 splits, 64 allocated, channels layout, interleave16) and the bf16 kernel's row
partials (its default split count). 8 calls per executable, the profiler's GPU time per call.
Why: the combination is launch-bound (grid B x K x D / channels = 32 programs at 32 channels on
132 SMs) and costs 2.4 us of the int4 call's ~51.5 (trace, session 14).

    PYTHONPATH=. python3 benchmarks/probes/combine_probe.py"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench_in_jit  # noqa: E402
from lcinfer.pallas_kernels import combine  # noqa: E402
from lcinfer.pallas_kernels import decode as dec  # noqa: E402

B, K, G, D, C = 1, 8, 4, 128, 128 * 1024


def partials(splits, g_pad, layout, seed=0):
  rng = np.random.default_rng(seed)
  s_pad = combine.padded_splits(splits, G)
  shape = (B, K, s_pad, D, g_pad) if layout == "channels" else (B, K, s_pad, g_pad, D)
  return (jnp.asarray(rng.standard_normal(shape), jnp.float32),
          jnp.asarray(rng.standard_normal((B, K, s_pad, g_pad)) * 5, jnp.float32))


def main():
  bf16_splits = dec.pick_config(jax.devices()[0], B, K, C, D)[0]
  cases = [("int4 O^T", 49, 8, "channels", True), (f"bf16 rows ({bf16_splits} splits)", bf16_splits, 16, "rows", False)]
  for name, splits, g_pad, layout, inter in cases:
    o, lse = partials(splits, g_pad, layout)
    base_out = None
    for channels in (32, 16, 8):
      if inter and channels < 16:
        continue
      for warps in (4, 2, 1):
        f = lambda o, l, c=channels, w=warps: combine.combine_partials(  # noqa: E731
            o, l, splits=splits, g=G, layout=layout, interleave16=inter, channels=c, num_warps=w,
            interpret=jax.default_backend() == "cpu")   # CPU: a smoke run of the probe itself
        out = np.asarray(f(o, lse)[0], np.float32)
        base_out = out if base_out is None else base_out
        diff = float(np.max(np.abs(out - base_out)))
        r = bench_in_jit(f, o, lse, reps=10)
        print(f"combine {name:22s} channels={channels:2d} warps={warps}: GPU {1e3 * (r.get('device_ms') or 0):6.2f} us, "
              f"wall {1e3 * r['ms']:6.2f} us per call | max |out - out(32 channels, 4 warps)| {diff:.2e}", flush=True)


if __name__ == "__main__":
  main()
