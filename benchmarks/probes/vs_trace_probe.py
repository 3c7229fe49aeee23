"""Probe (Hopper): the GPU timeline of one whole vertical-slash call per set (builder, kernel inputs,
gathered columns, the attention kernel), from jax's profiler (CUPTI): per call the span, the kernel's
own time, the sum of everything else and of the idle gaps between ops (synced calls, and bursts of
BURST calls dispatched back to back, as the benchmark times them), then the ops outside the kernel
by their time per call, largest first, with their lcinfer source lines (`hlo_sources`), and the
widest gaps by the op that waited. It says where the 1.5-3 ms a call spends outside the attention
kernel go. --variant exact[,programs=P]: the exact mode (far slashes as diagonals, 128x64 ranges)
instead, with each kernel's window in the synced call and how long the diagonal and the
block-sparse kernels ran at the same time.
    PYTHONPATH=. python3 benchmarks/probes/vs_trace_probe.py [--sets 1000,6096 ...] [--top 12] [--variant ranges]"""
import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hlo_sources import op_lines, op_sources, sources_of  # noqa: E402
from kernel_report import split_runs, traced_gpu_events  # noqa: E402
from kernels import vs_list_sizes, vs_max_cols, vs_pattern, vs_ranges_builder  # noqa: E402
from lcinfer.pallas_kernels import flash_mgpu  # noqa: E402
from lcinfer.pallas_kernels.diagonals import exact_vertical_slash_attention  # noqa: E402

RUNS = 4
BURST = 2


def _burst(f, args, n):
  out = [f(*args) for _ in range(n)]
  jax.block_until_ready(out)


def op_times(fn, *args, out_dir: str):
  """(per op name its GPU time per call (us), per op name the idle gap before it (us), span per
  call (us), gaps per call (us), burst span per call, burst gaps per call, the compiled HLO text,
  per op name its window (first start, last end) in the synced call (us from the call's start)):
  medians over RUNS synced calls, and over RUNS bursts of BURST back-to-back calls."""
  f = jax.jit(fn)
  text = f.lower(*args).compile().as_text()
  for _ in range(2):
    jax.block_until_ready(f(*args))
  events = traced_gpu_events(lambda: [_burst(f, args, n) for n in [1] * RUNS + [BURST] * RUNS],
                             tempfile.mkdtemp(dir=out_dir, prefix="vs-"))
  if not events:
    return None
  per_op, waits, spans, gaps, windows = defaultdict(list), defaultdict(list), [], [], defaultdict(list)
  for i, run in enumerate(split_runs(events, 2 * RUNS)):
    n = 1 if i < RUNS else BURST
    spans.append((run[-1][1] - run[0][0]) / 1e3 / n)
    idle = [(b[0] - a[1]) / 1e3 for a, b in zip(run, run[1:])]
    gaps.append(sum(max(g, 0) for g in idle) / n)
    if n == 1:
      acc, wait = defaultdict(float), defaultdict(float)
      first, last = {}, {}
      for (start, end, name), g in zip(run, [0.0] + idle):
        acc[name[:60]] += (end - start) / 1e3
        wait[name[:60]] += max(g, 0)
        first.setdefault(name[:60], (start - run[0][0]) / 1e3)
        last[name[:60]] = max(last.get(name[:60], 0.0), (end - run[0][0]) / 1e3)
      for name in first:
        windows[name].append((first[name], last[name]))
      for name in acc:
        per_op[name].append(acc[name])
        waits[name].append(wait[name])
  med = statistics.median
  return ({k: med(v) for k, v in per_op.items()}, {k: med(v) for k, v in waits.items()},
          med(spans[:RUNS]), med(gaps[:RUNS]), med(spans[RUNS:]), med(gaps[RUNS:]), text,
          {k: (med(a for a, _ in v), med(b for _, b in v)) for k, v in windows.items()})


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sets", nargs="*", default=["1000,6096", "30,800", "3500,100", "100,800"])
  ap.add_argument("--seq", type=int, default=131072)
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--out", default=tempfile.gettempdir())
  ap.add_argument("--variant", default="ranges", help="ranges, or exact[,programs=P]")
  a = ap.parse_args()
  exact = a.variant.startswith("exact")
  programs = int(a.variant.split("programs=")[1].split(",")[0]) if "programs=" in a.variant else None
  Path(a.out).mkdir(parents=True, exist_ok=True)
  s, h, d, bq, bk = a.seq, 32, 128, flash_mgpu.SPLIT_Q, 64
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (1, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
  rng = np.random.default_rng(0)
  for spec in a.sets:
    nv, ns = map(int, spec.split(","))
    vert, sl = vs_pattern(rng, s, h, nv, ns)
    build = vs_ranges_builder(s, nv, ns, bq, bk)

    def call(q, k, v, vj, sj, build=build, nv=nv, ns=ns):
      if exact:
        return exact_vertical_slash_attention(
            q, k, v, vj, sj, scale=d ** -0.5, block_q=128, block_k=bk, max_ranges=vs_list_sizes(ns, 128, bk)[0],
            max_cols=vs_max_cols(nv), diagonal_programs=programs, implementation="mosaic_gpu")[0]
      lay, cols = build(vj, sj)
      return flash_mgpu.block_sparse_attention_mgpu(q, k, v, lay, scale=d ** -0.5, columns=cols)[0]
    r = op_times(call, q, k, v, jnp.asarray(vert), jnp.asarray(sl), out_dir=a.out)
    if r is None:
      print(f"vstrace ({nv}, {ns}): no GPU events (CPU?)", flush=True)
      continue
    ops, waits, span, gap, bspan, bgap, text, windows = r
    sources = op_sources(text)
    kernel = sum(us for name, us in ops.items() if "lcinfer_flash_mgpu" in name)
    rest = sorted(((us, name) for name, us in ops.items() if "lcinfer_flash_mgpu" not in name), reverse=True)
    print(f"vstrace ({nv}, {ns}): synced span {span / 1e3:.2f} ms, kernel {kernel / 1e3:.2f} ms, other ops "
          f"{sum(us for us, _ in rest) / 1e3:.2f} ms in {len(rest)} ops, gaps {gap / 1e3:.2f} ms; burst of "
          f"{BURST}: {bspan / 1e3:.2f} ms a call, gaps {bgap / 1e3:.2f} ms a call", flush=True)
    if exact:   # the two attention kernels' windows in the synced call, and their overlap
      win = {tag: next((w for name, w in windows.items() if tag in name), None)
             for tag in ("lcinfer_flash_mgpu", "lcinfer_diagonal_fwd")}
      if all(win.values()):
        (a0, a1), (b0, b1) = win.values()
        print(f"vstrace   {a.variant}: block-sparse {a0 / 1e3:.2f}-{a1 / 1e3:.2f} ms, diagonals {b0 / 1e3:.2f}-"
              f"{b1 / 1e3:.2f} ms, at the same time {max(0.0, min(a1, b1) - max(a0, b0)) / 1e3:.2f} ms", flush=True)
    described = {k: [v] for k, v in op_lines(text).items()}   # ops an XLA pass made: their HLO
    for us, name in rest[:a.top]:
      where = sources_of(name, sources) or sources_of(name, described) or ["?"]
      print(f"vstrace   {us:9.1f} us  {name:34s} {' '.join(where)}", flush=True)
    for us, name in sorted(((us, name) for name, us in waits.items()), reverse=True)[:6]:
      print(f"vstrace   gap {us:7.1f} us before {name:34s} {' '.join(sources_of(name, sources)[:1])}",
            flush=True)


if __name__ == "__main__":
  main()
