"""Probe (H200): why the decode benchmark's wall clock read above the GPU's time, in three modes.

Why: session 16's `host` step measured the host's enqueue of a Mosaic GPU kernel with 2 TMA
descriptors and no work at ~40 us per execution (+~1 us per descriptor), and the int4 decode call
at ~45 us per call with 8 calls in one executable, near the GPU's 47 us.

`all`: host us per execution (enqueue loop, as `host_dispatch_probe.host_us`), x1 and x8 (8 calls
in one executable: the slope is one more call's host cost), of an XLA fusion (the baseline), the
2-descriptor Mosaic GPU kernel and the int4 decode call, in subprocesses under XLA_FLAGS variants
(default, command buffers off, graphs from one op up); then the profiler's host plane for the int4
x8 executable (the costliest event names, inclusive times). Seen: an XLA fusion costs ~40 us too
(the executable's dispatch, not Mosaic GPU), one more int4 call ~33 us (host under the GPU).
`burst`: wall clock against the GPU timeline of back-to-back executions (outputs kept or dropped,
x8 and x32 calls per executable, command buffers on and off): the gaps between executions are
3-7 us, so the wall clock's excess was not there.
`lengths`: wall clock per call against the burst length. Seen: the excess is a cost per sample
(~1 ms of dispatch and sync) that 100 ms bursts make ~1% (`kernel_report.burst_length`).
    PYTHONPATH=. python3 benchmarks/probes/host_trace_probe.py all|burst|lengths"""
import glob
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

FLAG_VARIANTS = {
    "default": "",
    "no-cmdbuf": "--xla_gpu_enable_command_buffer=",
    "graph>=1": "--xla_gpu_graph_min_graph_size=1",
}


def run(label: str, events: bool):
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from host_dispatch_probe import decode_calls, host_us, tma_kernel  # noqa: E402
  from kernel_report import prepare_in_jit  # noqa: E402

  int4, int4_args = decode_calls()["int4"]
  x = jnp.ones((64, 128), jnp.bfloat16)
  rows = [("xla fusion", lambda a: a * 2 + 1, (x,)), ("mosaic 2-descriptor", tma_kernel(1), (x,)),
          ("int4 decode call", int4, int4_args)]
  for name, fn, args in rows:
    per = {}
    for copies in (1, 8):
      compiled, cargs, _, _ = prepare_in_jit(fn, *args, copies=copies)
      per[copies] = host_us(compiled, cargs, 100)
    print(f"hostx {label:10s} {name:22s}: x1 {per[1]:7.1f} us, x8 {per[8]:7.1f} us per execution, "
          f"slope {(per[8] - per[1]) / 7:6.1f} us per extra call", flush=True)
  if not events:
    return
  compiled, cargs, _, _ = prepare_in_jit(int4, *int4_args, copies=8)
  for _ in range(3):
    jax.block_until_ready(compiled(*cargs))
  runs = 5
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(runs):
        jax.block_until_ready(compiled(*cargs))
    [xplane] = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(xplane)
  total, count = defaultdict(float), defaultdict(int)
  for plane in data.planes:
    if plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      for e in line.events:
        key = f"{line.name[:18]} | {e.name[:70]}"
        total[key] += (e.end_ns - e.start_ns) / 1e3 / runs
        count[key] += 1
  for key in sorted(total, key=total.get, reverse=True)[:28]:
    print(f"hostev {label:10s} {total[key]:9.1f} us x{count[key] / runs:5.1f} per execution: {key}")


def burst(label: str, n: int = 12):
  """Wall clock per call of back-to-back executions (as `bench_in_jit` samples), the GPU's span per
  call inside synced executions (`device_time`), and the GPU timeline of n unsynced executions:
  its span per call and the median gap between executions (where the GPU waits for the host)."""
  import jax
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from host_dispatch_probe import decode_calls  # noqa: E402
  from kernel_report import device_time, prepare_in_jit, sample, split_runs, traced_gpu_events  # noqa: E402
  calls = decode_calls()

  def keep(compiled, cargs, b):
    t = time.perf_counter()
    outs = [compiled(*cargs) for _ in range(b)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t) / b

  for copies in (8, 32):
    for name, (fn, args) in calls.items():
      compiled, cargs, b, _ = prepare_in_jit(fn, *args, copies=copies)
      wall = sorted(sample(compiled, cargs, b) for _ in range(5))[2] * 1e6 / copies
      wall_keep = sorted(keep(compiled, cargs, b) for _ in range(5))[2] * 1e6 / copies
      dev = device_time(compiled, cargs, copies) * 1e3
      for how, loop in (("kept", lambda: jax.block_until_ready([compiled(*cargs) for _ in range(n)])),
                        ("dropped", lambda: sample(compiled, cargs, n))):
        took = []   # the loop's wall clock inside the trace

        def timed(loop=loop):
          t = time.perf_counter()
          loop()
          took.append(time.perf_counter() - t)
        ev = traced_gpu_events(timed)
        traced_wall = took[0] * 1e6 / (n * copies)
        runs = split_runs(ev, n)
        span = (runs[-1][-1][1] - runs[0][0][0]) / 1e3 / (n * copies)
        gaps = sorted((b2[0][0] - a[-1][1]) / 1e3 for a, b2 in zip(runs, runs[1:]))
        print(f"hostb {label:9s} {name} x{copies:2d} burst {b:3d}: wall {wall:6.1f} (outputs kept {wall_keep:6.1f}) "
              f"us/call, GPU synced {dev:6.1f}; traced {n} outputs {how:7s}: wall {traced_wall:6.1f}, GPU span "
              f"{span:6.1f} us/call, gaps median {gaps[len(gaps) // 2]:6.1f} us (max {gaps[-1]:.1f})", flush=True)
      del cargs, compiled


def lengths():
  """Wall clock per call against the burst length (executions per sample: as `prepare` sizes them,
  and 5x and 20x that; session 16 ran it when `prepare` aimed at ~20 ms from one synced call),
  beside the GPU time, for the int4 and bf16 8-call executables: whether the wall clock's excess
  over the GPU time is a cost per sample (it shrinks as bursts grow) or per execution (it stays)."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from host_dispatch_probe import decode_calls  # noqa: E402
  from kernel_report import device_time, prepare_in_jit, sample  # noqa: E402
  for name, (fn, args) in decode_calls().items():
    compiled, cargs, b, _ = prepare_in_jit(fn, *args, copies=8)
    dev = device_time(compiled, cargs, 8) * 1e3
    walls = []
    for mult in (1, 5, 20):
      walls.append(sorted(sample(compiled, cargs, b * mult) for _ in range(5))[2] * 1e6 / 8)
    print(f"hostl {name}: burst {b} executions: wall {walls[0]:6.1f} us/call, x5 {walls[1]:6.1f}, x20 {walls[2]:6.1f}; "
          f"GPU {dev:6.1f}", flush=True)


def main():
  mode = sys.argv[1] if len(sys.argv) > 1 else "all"
  if mode == "lengths":
    lengths()
    return
  if mode == "run":
    run(sys.argv[2], events=sys.argv[3] == "1")
    return
  if mode == "burst1":
    burst(sys.argv[2])
    return
  if mode == "burst":
    for label, flags in list(FLAG_VARIANTS.items())[:2]:
      env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
      r = subprocess.run([sys.executable, __file__, "burst1", label], env=env, capture_output=True, text=True,
                         timeout=300)
      print("\n".join(ln for ln in (r.stdout + r.stderr).splitlines()[-30:] if ln.startswith("host") or "rror" in ln),
            flush=True)
    return
  for i, (label, flags) in enumerate(FLAG_VARIANTS.items()):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    r = subprocess.run([sys.executable, __file__, "run", label, "1" if i == 0 else "0"], env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("host") or "rror" in ln]
    print("\n".join(lines[-40:]), flush=True)


if __name__ == "__main__":
  main()
