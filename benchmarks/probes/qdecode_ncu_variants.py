"""Probe (H200, under ncu): the int4 Hopper decode kernel's GPU time per variant at 128K (B=1, H=32,
K=8), from ncu's gpu__time_duration of each launch: steadier than wall-clock timing (session 11: ncu
read 52.1-52.5 us over three launches while the timed call moved by +-5% between runs), so it can
tell variants a few percent apart. The bf16 decode kernel and the split-combination kernel are timed
alongside for reference.

    ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread -k regex:lcinfer_ --csv \\
        python3 benchmarks/probes/qdecode_ncu_variants.py run VARIANT... > ncu.csv
    python3 benchmarks/probes/qdecode_ncu_variants.py parse ncu.csv VARIANT...

A VARIANT is `default` or comma-separated `geometry` knobs, e.g. `num_stages=3` or
`num_splits=64,sub=1` (booleans as 0 / 1; `heads=N` sets the query heads, G = N / 8, default 32).
Each variant launches its kernel WARM + REPS times in order; `parse` assigns the launches back by
that count and prints the median of the last REPS."""
import csv
import io
import statistics
import sys
from pathlib import Path

WARM, REPS = 1, 5
BOOL_KNOBS = ("lazy_max", "q_direct", "fused_combine", "issue_warp", "pair", "wide", "packed")


def knobs(variant: str) -> dict:
  out = dict(num_splits=49, num_stages=2)
  if variant != "default":
    for item in variant.split(","):
      key, val = item.split("=")
      out[key] = bool(int(val)) if key in BOOL_KNOBS else val if key == "probe" else int(val)
  return out


def run(variants):
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from qdecode_mgpu_probe import inputs
  from lcinfer.pallas_kernels import decode as dec
  from lcinfer.pallas_kernels import decode_quant_mgpu as mq

  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, 128 * 1024)
  s = 128 ** -0.5
  for variant in variants:
    kn = knobs(variant)
    h = kn.pop("heads", 32)
    qh = q if h == 32 else jax.random.normal(jax.random.key(h), (1, 1, h, 128), jnp.float32).astype(q.dtype)
    g = mq.geometry(qh, kq, scale=s, window=None, block_k=64, **kn)
    f = jax.jit(lambda *a, g=g: mq._call(g, *a))
    args = (*mq._prepare(g, qh, qp), *mq._cache_args(g, kq, vq, pos))
    for _ in range(WARM + REPS):
      jax.block_until_ready(f(*args))
  # references: the bf16 kernel (its call launches the combination kernel too), then the int4 call
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  f = jax.jit(lambda *a: dec.decode_attention(*a, scale=s)[0])
  for _ in range(WARM + REPS):
    jax.block_until_ready(f(q, kb, vb, pos, qp))


def parse(path, variants):
  rows = [ln for ln in Path(path).read_text().splitlines(keepends=True) if ln.startswith('"')]
  table = list(csv.DictReader(io.StringIO("".join(rows))))
  launches = [(r["Kernel Name"], float(r["Metric Value"].replace(",", "")) / 1e3)
              for r in table if r["Metric Name"] == "gpu__time_duration.sum"]
  regs = [r["Metric Value"] for r in table
          if r["Metric Name"] == "launch__registers_per_thread" and "qdecode" in r["Kernel Name"]]
  by_name = {}
  for name, us in launches:
    by_name.setdefault(name.split("(")[0], []).append(us)
  qd = next((v for n, v in by_name.items() if "qdecode" in n), [])
  n = WARM + REPS
  if len(qd) != n * len(variants):
    print(f"ncu: {len(qd)} int4 launches for {len(variants)} variants x {n}: cannot assign them")
  base = None
  for i, variant in enumerate(variants):
    us = qd[i * n + WARM:(i + 1) * n]
    if not us:
      continue
    med = statistics.median(us)
    base = base or med
    reg = regs[i * n] if len(regs) == len(qd) else "?"
    print(f"ncu {variant:40s} {med:7.2f} us (min {min(us):.2f}, max {max(us):.2f}) {med / base:6.3f}x default, "
          f"{reg} registers")
  for name, us in by_name.items():
    if "qdecode" not in name:
      print(f"ncu {name[:40]:40s} {statistics.median(us[WARM:] or us):7.2f} us ({len(us)} launches)")


BALANCE_METRICS = ("gpu__time_duration.sum,sm__cycles_elapsed.max,sm__cycles_active.min,sm__cycles_active.avg,"
                   "sm__cycles_active.max,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,"
                   "launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers")


def parse_balance(path, variants):
  """Per variant of the int4 kernel and per other kernel (median over its launches but the warm-up):
  time, how long its SMs were active (least / mean / most busy SM, as a fraction of the kernel's
  elapsed cycles: a wide spread is a tail where few CTAs still run), DRAM bytes read and DRAM
  throughput in % of peak."""
  rows = [ln for ln in Path(path).read_text().splitlines(keepends=True) if ln.startswith('"')]
  launches = {}   # ID -> (kernel name, {metric: value})
  for r in csv.DictReader(io.StringIO("".join(rows))):
    name = r["Kernel Name"].split("(")[0][:40]
    launches.setdefault(int(r["ID"]), (name, {}))[1][r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
  groups, n = {}, WARM + REPS
  qd = [m for _, (name, m) in sorted(launches.items()) if "qdecode" in name]
  for i, variant in enumerate(variants):
    groups[f"int4 {variant}"] = qd[i * n + WARM:(i + 1) * n]
  for _, (name, m) in sorted(launches.items()):
    if "qdecode" not in name:
      groups.setdefault(name, []).append(m)
  nan = float("nan")
  for name, ms in groups.items():
    ms = ms[WARM:] if "qdecode" not in name and len(ms) > WARM else ms
    med = {k: statistics.median(m.get(k, nan) for m in ms) for k in ms[0]} if ms else {}
    el = med.get("sm__cycles_elapsed.max", nan)
    act = "/".join(f"{med.get('sm__cycles_active.' + a, nan) / el:.3f}" for a in ("min", "avg", "max"))
    print(f"balance {name:40s} {med.get('gpu__time_duration.sum', 0) / 1e3:7.2f} us | SM active min/avg/max "
          f"{act} of elapsed | DRAM read {med.get('dram__bytes_read.sum', 0) / 1e6:7.1f} MB, "
          f"{med.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', nan):5.1f}% of peak | CTAs per SM by "
          f"shared memory {med.get('launch__occupancy_limit_shared_mem', nan):.0f}, by registers "
          f"{med.get('launch__occupancy_limit_registers', nan):.0f}")


if __name__ == "__main__":
  if sys.argv[1] == "run":
    run(sys.argv[2:])
  elif sys.argv[1] == "metrics":
    print(BALANCE_METRICS)
  elif sys.argv[1] == "balance":
    parse_balance(sys.argv[2], sys.argv[3:])
  else:
    parse(sys.argv[2], sys.argv[3:])
