"""Probe (H200): the GPU timeline of the decode benchmark's executables (8 calls each, as
`bench_in_jit` times them), from jax's profiler (CUPTI): per call, the span, the kernels' own time
and the gaps between them, and per kernel its median duration in place. It tells how much of the
~9 us between the int4 call's benchmark time and its kernel's ncu time is in the kernels and how
much between them.
    PYTHONPATH=. python3 benchmarks/probes/decode_trace_probe.py [--out DIR]"""
import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import prepare_in_jit, split_runs, traced_gpu_events  # noqa: E402
from qdecode_mgpu_probe import inputs  # noqa: E402
from lcinfer.pallas_kernels import decode as dec  # noqa: E402
from lcinfer.pallas_kernels import decode_quant_mgpu as mq  # noqa: E402

COPIES, RUNS = 8, 4
VARIANTS = (dict(),)   # int4 geometry knobs beside the default (session 13 ran fold=True on its branch)


def short(name: str) -> str:
  for key in ("lcinfer_", "combine", "memset", "Memset", "fusion", "input_", "loop_", "wrapped_"):
    if key in name:
      return name[name.index(key):][:40]
  return name[:40]


def timeline(label: str, fn, *args, out_dir: str):
  compiled, cargs, _, _ = prepare_in_jit(fn, *args, copies=COPIES)
  for _ in range(3):
    jax.block_until_ready(compiled(*cargs))
  ev = traced_gpu_events(lambda: [jax.block_until_ready(compiled(*cargs)) for _ in range(RUNS)],
                         tempfile.mkdtemp(dir=out_dir, prefix=label.replace(" ", "_") + "-"))
  if not ev:
    print(f"trace {label}: no GPU events (CPU?)")
    return
  runs = split_runs(ev, RUNS)   # executions are separated by host syncs
  spans, busy, gaps = [], [], []
  per_kernel, gap_before = defaultdict(list), defaultdict(list)
  for r in runs:
    spans.append((r[-1][1] - r[0][0]) / COPIES)
    busy.append(sum(e[1] - e[0] for e in r) / COPIES)
    gaps.append(sum(max(0, b[0] - a[1]) for a, b in zip(r, r[1:])) / COPIES)
    for i, e in enumerate(r):
      per_kernel[short(e[2])].append((e[1] - e[0]) / 1e3)
      if i:
        gap_before[short(e[2])].append((e[0] - r[i - 1][1]) / 1e3)
  med = statistics.median
  print(f"trace {label}: {len(runs)} runs, {len(ev) // max(1, len(runs))} events per run | per call: span "
        f"{med(spans) / 1e3:.2f} us, kernels {med(busy) / 1e3:.2f} us, gaps {med(gaps) / 1e3:.2f} us", flush=True)
  for name, ds in per_kernel.items():
    g = gap_before.get(name, [0.0])
    print(f"trace   {name:40s} x{len(ds) // len(runs):3d} per run: {med(ds):8.2f} us (min {min(ds):.2f}, "
          f"max {max(ds):.2f}), gap before {med(g):6.2f} us", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=tempfile.gettempdir())
  a = ap.parse_args()
  Path(a.out).mkdir(parents=True, exist_ok=True)
  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, 128 * 1024)
  s = 128 ** -0.5
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  del k, v
  timeline("bf16 call", lambda *x: dec.decode_attention(*x, scale=s)[0], q, kb, vb, pos, qp, out_dir=a.out)
  del kb, vb
  for knobs in VARIANTS:
    g = mq.geometry(q, kq, scale=s, window=None, block_k=64, num_splits=49, num_stages=2, **knobs)
    tag = ",".join(f"{k}={v}" for k, v in knobs.items()) or "default"
    timeline(f"int4 {tag}", lambda *x, g=g: mq._run(g, *x)[0], q, kq, vq, pos, qp, out_dir=a.out)
    if not knobs:
      timeline("int4 kernel alone", lambda *x, g=g: mq._call(g, *x), *mq._prepare(g, q, qp),
               *mq._cache_args(g, kq, vq, pos), out_dir=a.out)


if __name__ == "__main__":
  main()
