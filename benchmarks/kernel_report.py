"""Timing, result rows and the markdown report of benchmarks/kernels.py (kept apart so that the
benchmark file holds only what is measured)."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import jax

def rand(key, shape, dtype=None):
  """Standard normal inputs in dtype (default bfloat16), drawn in float32."""
  import jax.numpy as jnp
  return jax.random.normal(key, shape, jnp.float32).astype(dtype or jnp.bfloat16)


BURST_S = 0.1      # seconds of back-to-back executions per sample
MAX_BURST = 2000


def burst_length(compiled, args, target_s: float | None = None) -> int:
  """Executions per sample for ~target_s of steady state. The time per execution comes from
  back-to-back calibration bursts (4x longer until one lasts 10 ms), not from one synced call: a
  synced call carries ~1 ms of dispatch and sync latency on the H200 host (session 16: the int4
  decode executable, 0.38 ms of GPU work, took ~1.5 ms synced), and that latency is a cost per
  sample that only long bursts make small (int4 wall clock 51.2 / 48.4 / 48.1 us per call at
  ~5 / 25 / 100 ms bursts against 47.4 of GPU time; bf16 145.6 / 139.9 / 138.6 against 138.5)."""
  target_s = BURST_S if target_s is None else target_s

  seconds = lambda n: sample(compiled, args, n) * n  # noqa: E731
  n = 1
  while (dt := seconds(n)) < 0.01 and n < MAX_BURST:
    n *= 4
  per = min(dt / n, seconds(n) / n)   # again: the first bursts after compiling ran slower (session 16: an
  return max(1, min(MAX_BURST, int(target_s / max(per, 1e-9))))   # int4 call sized for 14 ms, not 100)


def prepare(fn, *args):
  """(compiled, compile seconds, burst): compiled once, warmed up, and a burst length of
  back-to-back calls that lasts ~BURST_S (`burst_length`: so that short kernels are not timed
  through Python dispatch and sync latency)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm-up: the first execution loads, allocates, records graphs
  return compiled, compile_s, burst_length(compiled, args)


def sample(compiled, args, burst: int) -> float:
  """Seconds per call over one burst ended by one sync."""
  t = time.perf_counter()
  out = None
  for _ in range(burst):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / burst


def bench(fn, *args, reps: int = 7, device: bool = False) -> dict:
  """{'ms': median over `reps` bursts of the steady-state ms per call, 'compile_s', 'runs', 'burst'};
  device=True adds 'device_ms' (`device_time` of single synced calls: the GPU's span per call,
  without the ~1 ms of dispatch and sync that each wall-clock sample carries, where there is a GPU)."""
  compiled, compile_s, burst = prepare(fn, *args)
  ts = [sample(compiled, args, burst) for _ in range(reps)]
  r = {"ms": statistics.median(ts) * 1e3, "compile_s": compile_s, "runs": reps, "burst": burst}
  if device and (dev_ms := device_time(compiled, args, copies=1)) is not None:
    r["device_ms"] = dev_ms
  return r


def prepare_in_jit(fn, *args, copies: int = 8):
  """(compiled, its argument, burst, compile seconds) for `copies` calls of fn traced into one
  executable, each on its own copy of every argument (`bench_in_jit`)."""
  copy = lambda x: jax.numpy.array(x, copy=True)  # noqa: E731
  all_args = [jax.tree.map(copy, args) for _ in range(copies)]
  compiled, compile_s, burst = prepare(lambda all_args: [fn(*a) for a in all_args], all_args)
  return compiled, (all_args,), burst, compile_s


def gpu_events(xplane_path: str) -> list[tuple[int, int, str]]:
  """(start_ns, end_ns, name) of every kernel and memory operation on the GPU planes' stream lines of a
  jax profiler trace (CUPTI), sorted; [] when the trace has no GPU plane (CPU)."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  events = set()
  for plane in data.planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        if "stream" in line.name.lower():
          events.update((int(e.start_ns), int(e.end_ns), e.name) for e in line.events)
  return sorted(events)


def traced_gpu_events(work, trace_dir: str | None = None) -> list[tuple[int, int, str]]:
  """The sorted GPU events (`gpu_events`) of everything `work()` runs under jax's profiler, traced
  into trace_dir (kept) or a temporary directory; [] on CPU."""
  import contextlib
  import glob
  import tempfile
  with tempfile.TemporaryDirectory() if trace_dir is None else contextlib.nullcontext(trace_dir) as d:
    with jax.profiler.trace(d):
      work()
    return sorted(e for f in glob.glob(f"{d}/**/*.xplane.pb", recursive=True) for e in gpu_events(f))


def spans_per_call(events: list[tuple], runs: int, copies: int) -> list[float]:
  """Seconds per call of each of `runs` executions of an executable of `copies` calls, from their
  GPU events: the executions are the groups left by cutting the timeline at its runs - 1 widest
  gaps (each execution was synced, so the host's dispatch lies between them), and a group's span
  (first start to last end) is the GPU's time for its calls, idle gaps inside included."""
  return [(max(ev[1] for ev in g) - g[0][0]) * 1e-9 / copies for g in split_runs(events, runs)]


def split_runs(events: list[tuple], runs: int) -> list[list[tuple]]:
  """The sorted GPU events of `runs` synced executions, one list per execution: the timeline cut at
  its runs - 1 widest gaps."""
  if len(events) < runs:
    raise ValueError(f"{len(events)} GPU events for {runs} runs: the trace missed kernels")
  gaps = sorted(range(1, len(events)), key=lambda i: events[i][0] - events[i - 1][1])[len(events) - runs:]
  cuts = [0, *sorted(gaps), len(events)]
  return [events[a:b] for a, b in zip(cuts, cuts[1:])]


def device_time(compiled, cargs, copies: int, runs: int = 5) -> float | None:
  """Median GPU time per call (ms) of a `prepare_in_jit` executable, from the profiler's timeline:
  the device's own time, without the host's dispatch and sync around each sample, which the
  wall-clock samples of `bench_in_jit` carry (~1 ms per sample on the H200 host: ~1% of a ~100 ms
  burst). None where the trace has no GPU events (CPU)."""
  events = traced_gpu_events(lambda: [jax.block_until_ready(compiled(*cargs)) for _ in range(runs)])
  if not events:
    return None
  return statistics.median(spans_per_call(events, runs, copies)) * 1e3


def bench_in_jit(fn, *args, copies: int = 8, reps: int = 7, against=None, prepared=None) -> dict:
  """`bench` for calls shorter than their host dispatch (decode: a jitted call costs ~50-70 us of
  Python and runtime on the H200 host, as long as an int4 decode kernel): `copies` calls traced into
  one executable, each on its own copy of every argument (distinct buffers: no L2 reuse between
  calls, and nothing XLA can merge or fuse across them), timed as one. 'ms' is per call, wall clock:
  the GPU's time plus 1/copies of the host's dispatch between executions ('device_ms' has the GPU's
  time alone, as inside a model's decode step); 'ms_dispatch' is `bench`'s one call per dispatch.
  against: another `prepare_in_jit` result (a reference call); its samples are then taken in turn
  with this call's, and 'x_against' is the median over those rounds of this sample / its sample
  (a ratio that drift of the machine between rows does not move). prepared: this call's
  `prepare_in_jit` result, when the caller already has it (not compiled again). 'device_ms': the
  GPU timeline's time per call (`device_time`), where there is a GPU."""
  compiled, cargs, burst, compile_s = prepared or prepare_in_jit(fn, *args, copies=copies)
  dev_ms = device_time(compiled, cargs, copies)
  ts, ratios = [], []
  for _ in range(reps):
    ts.append(sample(compiled, cargs, burst))
    if against is not None:
      ratios.append(ts[-1] / sample(against[0], against[1], against[2]))
  del cargs
  r = {"ms": statistics.median(ts) * 1e3 / copies, "compile_s": compile_s, "runs": reps, "burst": burst,
       "copies": copies, "ms_dispatch": bench(fn, *args, reps=reps)["ms"]}
  if ratios:
    r["x_against"] = statistics.median(ratios)
  if dev_ms is not None:
    r["device_ms"] = dev_ms
  return r


def bench_interleaved(fns: dict, *args, reps: int = 7) -> dict:
  """Like `bench` for several implementations of one call, their samples taken in turn (a, b, c,
  a, b, c, ...), so that drift of a shared, noisy machine hits all of them alike. Returns
  {name: result dict or {'error': ...}}."""
  ready, out = {}, {}
  for name, fn in fns.items():
    try:
      ready[name] = prepare(fn, *args)
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
      traceback.print_exc()
      out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  ts = {name: [] for name in ready}
  for _ in range(reps):
    for name, (compiled, _, burst) in ready.items():
      ts[name].append(sample(compiled, args, burst))
  for name, (_, compile_s, burst) in ready.items():
    out[name] = {"ms": statistics.median(ts[name]) * 1e3, "compile_s": compile_s, "runs": reps,
                 "burst": burst, "interleaved": True}
  return out


def attempt(rows: list, name: str, fn):
  """Run fn() -> dict; a failure becomes a row with the error (the benchmark goes on)."""
  try:
    r = fn()
  except Exception as e:  # noqa: BLE001 - recorded, not hidden
    traceback.print_exc()
    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  r = {"name": name, **r}
  rows.append(r)
  print(json.dumps(r), flush=True)
  if SAVE is not None:  # results so far stay on disk if a later section dies or runs out of time
    SAVE(rows)
  return r


SAVE = None  # set by the benchmark: rows -> files, after every row


def device_info() -> dict:
  dev = jax.devices()[0]
  info = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  try:
    import importlib.metadata as md
    info["jaxlib"] = md.version("jaxlib")
    plug = [p for p in ("jax-cuda13-plugin", "jax-cuda12-plugin") if _has_dist(md, p)]
    info["cuda_plugin"] = f"{plug[0]} {md.version(plug[0])}" if plug else None
  except Exception:  # noqa: BLE001
    pass
  try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
  except Exception:  # noqa: BLE001
    info["nvidia_smi"] = None
  return info


def _has_dist(md, name):
  try:
    md.version(name)
    return True
  except md.PackageNotFoundError:
    return False


def table_density(v: int, n_slash: int, seq_len: int) -> float:
  """The density column of BENCHMARKS.md's vertical-slash table: each of the v verticals and s
  slashes counted as seq_len pairs, over the seq_len^2 / 2 pairs of causal attention, 2 (v + s) / S
  (0.108 / 0.013 / 0.055 / 0.014 at 128K). MInference's efficiencies there (65% on (1000, 6096),
  37% on (3500, 100)) are this density x 232.6 ms / its time. It counts the rows above a vertical
  and a far slash's missing rows as kept, so it reads up to ~2x the exact pair fraction (0.055
  against 0.028 on (3500, 100)): the benchmark reports both."""
  return 2 * (v + n_slash) / seq_len


def vs_efficiencies(r: dict) -> tuple[float | None, float | None]:
  """(exact-pair efficiency, BENCHMARKS.md-density efficiency) of a vertical-slash row, both
  density x dense time / time; the second from the row's speedup, so older result files render too."""
  nominal = table_density(r["v"], r["s"], r["S"]) * r["speedup"] if "speedup" in r else None
  return r.get("efficiency"), nominal


def fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def table(out, rows, title, key_heads, keys, value_heads, values, intro=()):
  """Append a markdown section: its intro lines, then one line per row, its key cells, then its
  values (or the error)."""
  if not rows:
    return
  heads = key_heads + value_heads
  out += [f"## {title}", "", *intro, *([""] if intro else []),
          "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
  for r in rows:
    vals = values(r) if "ms" in r else [f"error: {r['error']}"] + [""] * (len(value_heads) - 1)
    out.append("| " + " | ".join(str(c) for c in keys(r) + vals) + " |")
  out.append("")


def markdown(info, rows, command) -> str:
  out = [f"# Kernel benchmarks: {info['device']}", "",
         f"- device: {info.get('nvidia_smi') or info['device']}; {info['date']}",
         f"- jax {info['jax']}, jaxlib {info.get('jaxlib')}, {info.get('cuda_plugin')}, Python {info['python']}",
         f"- command: `{command}`",
         f"- timing: compiled once (compile time apart), warm-up, then the median of {info.get('reps', 7)} samples"
         f" ({max(info.get('reps', 7), 20)} for decode),",
         f"  each a burst of back-to-back calls (~{info.get('burst_s', BURST_S) * 1e3:.0f} ms) ended by one sync"
         " (dense implementations: their",
         "  samples taken in turn); fresh random bf16 inputs. Decode: 8 calls, each on its own copy of every",
         "  input, in one executable, time / 8: one jitted call per dispatch costs ~50-70 us of host time,",
         "  as long as the int4 kernel. The one-call-per-dispatch time is shown beside it. 'time / bf16,",
         "  paired': the median over rounds of (this row's sample / a bf16 sample taken right after it),",
         "  which drift of the machine between rows does not move. 'device ms': the GPU's time per call",
         "  from the profiler's timeline (CUPTI), median of 5 executions of the same 8-call executable:",
         "  the time without the host's dispatch and sync around each sample, which the wall-clock 'ms'",
         "  carries (~1 ms per sample of ~100 ms). Vertical-slash: 'device ms' is the GPU's span of one",
         "  synced call (index and kernel), median of 5, and 'speedup, device times' divides cuDNN dense's",
         "  device ms by it (the wall-clock samples are 2-6 calls of the sparse kernel, 1 of cuDNN dense).",
         "  The wall clock per call is above it because calls in a burst run slower, not from a fixed cost",
         "  per sample (H200, probes/vs_burst_probe.py: from 1 to 8 calls a sample, (1000, 6096) 42.10 ->",
         "  42.47 ms a call and cuDNN dense 245.6 -> 252.2 ms, fitted fixed cost <= 0)", ""]
  by = lambda sec: [r for r in rows if r.get("section") == sec]  # noqa: E731
  copy = [r for r in rows if r["name"] == "copy"]
  if copy and "GB/s" in copy[0]:
    out += [f"Copy bandwidth (2 GiB, read + write): {copy[0]['GB/s']:.0f} GB/s", ""]
  dense = lambda r: [r["impl"] if "ms" in r else r["name"], r["S"]]  # noqa: E731
  table(out, by("dense"), "Dense causal attention forward (B=1, H=32, D=128, bf16)",
        ["implementation", "S"], dense, ["ms", "TFLOP/s", "x cuDNN", "compile s"],
        lambda r: [fmt(r.get("ms"), ".2f"), fmt(r.get("TFLOP/s")), fmt(r.get("x_cudnn"), ".3f"),
                   fmt(r.get("compile_s"))])
  table(out, by("block_sparse"), "Block-sparse (random blocks kept among the causal ones, the diagonal always)",
        ["kernel", "blocks", "S", "density"],
        lambda r: [r.get("impl", "triton"), f"{r['block_q']}x{r['block_k']}", r["S"], f"{r['density']:.3f}"],
        ["ms", "speedup vs cuDNN dense", "efficiency"],
        lambda r: [fmt(r.get("ms"), ".2f"), fmt(r.get("speedup"), ".2f"), fmt(r.get("efficiency"), ".2f")])
  table(out, by("vertical_slash"), "Vertical-slash (index construction included)",
        ["(v, s)", "layout", "KV heads", "density: pairs", "density: BENCHMARKS.md"],
        lambda r: [f"({r['v']}, {r['s']})", f"{r['layout']} {r['block']}", r["kv_heads"], f"{r['density']:.3f}",
                   f"{table_density(r['v'], r['s'], r['S']):.3f}"],
        ["ms", "of which index ms", "speedup vs cuDNN dense", "efficiency: pairs", "efficiency: BENCHMARKS.md",
         "MInference ms (BENCHMARKS.md)", "device ms", "speedup, device times"],
        lambda r: [fmt(r.get("ms"), ".2f"), fmt(r.get("index_ms"), ".2f"), fmt(r.get("speedup"), ".2f"),
                   *(fmt(e, ".3f") for e in vs_efficiencies(r)), fmt(r.get("minference_ms")),
                   fmt(r.get("device_ms"), ".2f"), fmt(r.get("speedup_device"), ".2f")],
        intro=["Efficiency = density x cuDNN dense time / time, with two densities. 'pairs': the exact",
               "fraction of causal (q, k) pairs the pattern keeps. 'BENCHMARKS.md': that file's density column,",
               "2 (v + s) / S, which counts every vertical and slash as S pairs (the rows above a vertical and a",
               "far slash's missing rows too); MInference's 65% on (1000, 6096) and 37% on (3500, 100) there are",
               "computed with it. It reads 1.11 / 1.03 / 1.96 / 1.08x the exact fraction on the four sets at 128K."])
  table(out, by("decode"), "Decode attention (B=1, H=32, K=8, D=128, one query per head, every slot valid)",
        ["implementation", "cache", "C"], lambda r: [r["impl"], r["cache"], r["C"]],
        ["ms", "GB/s (K+V bytes read)", "of copy bandwidth", "time / bf16", "time / bf16, paired",
         "device ms", "device time / bf16", "ms, one call per dispatch"],
        lambda r: [fmt(r.get("ms"), ".4f"), fmt(r.get("GB/s"), ".0f"), fmt(r.get("x_copy_bw"), ".2f"),
                   fmt(r.get("x_bf16_time"), ".3f"), fmt(r.get("x_against"), ".3f"), fmt(r.get("device_ms"), ".4f"),
                   fmt(r.get("x_bf16_device"), ".3f"), fmt(r.get("ms_dispatch"), ".4f")])
  table(out, by("tune_flash") + by("tune_decode"), "Tuning sweeps", ["config"], lambda r: [r["name"]],
        ["ms", "TFLOP/s or GB/s"],
        lambda r: [fmt(r.get("ms"), ".3f"), fmt(r.get("TFLOP/s", r.get("GB/s")))])
  return "\n".join(out)


def rerender(json_path) -> str:
  """The markdown of a committed result file rebuilt from its .json: the tables rendered anew, the
  text above the first table (header and hand-written notes) kept as it is in the .md."""
  json_path = Path(json_path)
  data = json.loads(json_path.read_text())
  md_path = json_path.with_suffix(".md")
  fresh = markdown(data["info"], data["rows"], data["command"])
  if not md_path.exists():
    return fresh
  old = md_path.read_text()
  if "\n## " not in old or "\n## " not in fresh:
    raise ValueError(f"{md_path}: no '## ' table section to replace; rerender only rewrites tables")
  return old[:old.index("\n## ")] + fresh[fresh.index("\n## "):]


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description="Rewrite the tables of benchmarks/results/*.md from their "
                               ".json (after a change to the report's columns), keeping the notes above them.")
  ap.add_argument("json", nargs="+", help="result files, e.g. benchmarks/results/kernels-nvidia-h200-vs.json")
  for path in ap.parse_args().json:
    text = rerender(path)   # all of it rendered before the write: a bad file leaves the .md as it was
    Path(path).with_suffix(".md").write_text(text)
    print("rewrote", Path(path).with_suffix(".md"))
