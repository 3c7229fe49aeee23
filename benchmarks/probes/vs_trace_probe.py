"""Probe (Hopper): the GPU timeline of one whole vertical-slash call per set (builder, kernel inputs,
gathered columns, the attention kernel), from jax's profiler (CUPTI): per call the span, the kernel's
own time and the sum of everything else, then the ops outside the kernel by their time per call,
largest first. It says where the 1.5-3 ms a call spends outside the attention kernel go.
    PYTHONPATH=. python3 benchmarks/probes/vs_trace_probe.py [--sets 1000,6096 ...] [--top 12]"""
import argparse
import functools
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import split_runs, traced_gpu_events  # noqa: E402
from kernels import vs_list_sizes, vs_pattern  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402
from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges  # noqa: E402

RUNS = 4


def op_times(fn, *args, out_dir: str):
  """Per op name, its GPU time per call (us, median over RUNS synced calls), and the spans (us)."""
  f = jax.jit(fn)
  for _ in range(2):
    jax.block_until_ready(f(*args))
  events = traced_gpu_events(lambda: [jax.block_until_ready(f(*args)) for _ in range(RUNS)],
                             tempfile.mkdtemp(dir=out_dir, prefix="vs-"))
  if not events:
    return None, None
  per_op, spans = defaultdict(list), []
  for run in split_runs(events, RUNS):
    spans.append((run[-1][1] - run[0][0]) / 1e3)
    acc = defaultdict(float)
    for start, end, name in run:
      acc[name[:60]] += (end - start) / 1e3
    for name, us in acc.items():
      per_op[name].append(us)
  return {name: statistics.median(v) for name, v in per_op.items()}, statistics.median(spans)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sets", nargs="*", default=["1000,6096", "30,800", "3500,100", "100,800"])
  ap.add_argument("--seq", type=int, default=131072)
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--out", default=tempfile.gettempdir())
  a = ap.parse_args()
  Path(a.out).mkdir(parents=True, exist_ok=True)
  s, h, d, bq, bk = a.seq, 32, 128, flash_mgpu.SPLIT_Q, 64
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
  rng = np.random.default_rng(0)
  for spec in a.sets:
    nv, ns = map(int, spec.split(","))
    vert, sl = vs_pattern(rng, s, h, nv, ns)
    build = functools.partial(vertical_slash_to_ranges, seq_len=s, block_q=bq, block_k=bk,
                              max_ranges=vs_list_sizes(ns, bq, bk)[0], max_cols=max(32, -(-nv // 32) * 32))

    def call(q, k, v, vj, sj, build=build):
      lay, cols = build(vj, sj)
      return flash_mgpu.block_sparse_attention_mgpu(q, k, v, lay, scale=d ** -0.5, columns=cols)[0]
    ops, span = op_times(call, q, k, v, jnp.asarray(vert), jnp.asarray(sl), out_dir=a.out)
    if ops is None:
      print(f"vstrace ({nv}, {ns}): no GPU events (CPU?)", flush=True)
      continue
    kernel = sum(us for name, us in ops.items() if "lcinfer_flash_mgpu" in name)
    rest = sorted(((us, name) for name, us in ops.items() if "lcinfer_flash_mgpu" not in name), reverse=True)
    print(f"vstrace ({nv}, {ns}): span {span / 1e3:.2f} ms, kernel {kernel / 1e3:.2f} ms, other ops "
          f"{sum(us for us, _ in rest) / 1e3:.2f} ms in {len(rest)} ops", flush=True)
    for us, name in rest[:a.top]:
      print(f"vstrace   {us:9.1f} us  {name}", flush=True)


if __name__ == "__main__":
  main()
