"""Probe (Hopper): where the Hopper attention kernel's time goes inside its CTAs, from Mosaic GPU's
in-kernel profiler (`flash_mgpu_kernel.region`: clock cycles of named regions, one begin / end pair
a warpgroup per region).

Per region: how many a CTA runs, cycles each, and the share of the consumer warpgroups' time. The
step regions are named <kind>.<part>: kind the loop (shared, shared_columns, colmasked, masked,
whole, columns; `flash_mgpu.py`), part one of bias (the per-key mask, before the K wait), wait_k,
qk (wgmma, the ping-pong turn, its result), softmax, wait_v (the other consumer's turn, then V), pv;
then idle (split mode's barrier-only steps), q_wait, end_sync, store_wait, and the producer's
p.wait_free. Why: the vertical-slash kernel computes its column and band steps at roughly half the
dense kernel's rate per pair ((3500, 100): ~13.6 ms of kernel for 6.96 ms of pairs at cuDNN's
rate), and ncu could not profile those calls; this says which part of a step is slow.

Cases: "V,S:PART:VARIANT" (a vertical-slash set, `kernels.vs_subset` part, `vs_knobs` variant) or
"dense:S" (the dense causal kernel at length S). Each case is timed unprofiled, then run once
profiled; beside its table, a CTA's mean span profiled against the unprofiled time per CTA slot
(what the clock reads cost).
    PYTHONPATH=. python3 benchmarks/probes/kprof.py [CASE ...] [--space 1024] [--ghz 1.98]"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT = 1 << 31
HEADER = 3   # a trace's first entries: start time, SM id, entries used


def summarize(buffer, names: dict[str, int], traces_per_block: int, entries: int, prefix: str = "k:") -> dict:
  """Per region (names starting with `prefix`): {'count', 'cycles'} summed over all CTAs, plus
  'blocks', 'consumer_cycles' (the consumer traces' spans, first to last event; the last trace of
  a block is the producer's) and 'unpaired' (begins without their end: truncated traces).
  buffer: the profiler's uint32 buffer, [blocks x traces x entries] flat, each trace HEADER entries
  then (tag, clock) pairs; a tag is a name id, | EXIT for an end."""
  buf = np.asarray(buffer, np.uint32).reshape(-1, traces_per_block, entries)
  n_blocks = buf.shape[0]
  used = buf[..., 2].astype(np.int64)                      # entries of events, 2 an event
  ev = buf[..., HEADER:]
  tags, clks = ev[..., 0::2], ev[..., 1::2]                # [blocks, traces, max events]
  valid = np.arange(tags.shape[-1])[None, None, :] < (used // 2)[..., None]
  ids = {i: n for n, i in names.items() if n.startswith(prefix)}
  known = np.isin(tags & np.uint32(~EXIT & 0xFFFFFFFF), np.fromiter(ids, np.uint32, len(ids)))
  keep = valid & known
  trace = np.broadcast_to(np.arange(n_blocks * traces_per_block).reshape(n_blocks, traces_per_block, 1), tags.shape)
  t, c, tr = tags[keep], clks[keep], trace[keep]           # row-major: traces in order, events in order
  begin = (t & np.uint32(EXIT)) == 0
  pair = begin[:-1] & (t[1:] == (t[:-1] | np.uint32(EXIT))) & (tr[1:] == tr[:-1])
  dur = (c[1:].astype(np.int64) - c[:-1].astype(np.int64)) % (1 << 32)   # the clock is 32-bit
  out = {}
  for i, name in ids.items():
    sel = pair & (t[:-1] == i)
    out[name[len(prefix):]] = {"count": int(sel.sum()), "cycles": int(dur[sel].sum())}
  # consumer spans: first to last recorded event of each consumer trace (all events, any name)
  n_ev = used // 2
  first = clks[..., 0].astype(np.int64)
  last = np.take_along_axis(clks, np.maximum(n_ev - 1, 0)[..., None], axis=-1)[..., 0].astype(np.int64)
  span = np.where(n_ev > 0, (last - first) % (1 << 32), 0)
  return {"regions": out, "blocks": n_blocks, "consumer_cycles": int(span[:, :-1].sum()),
          "unpaired": int(begin.sum() - pair.sum())}   # every pair has one begin


def table(summary: dict, ghz: float) -> list[str]:
  """Rows: region, a CTA's count, cycles each, us each at ghz, share of the consumers' cycles."""
  rows = ["| region | per CTA | cycles each | us each | share of consumer time |", "|---|---|---|---|---|"]
  total = max(summary["consumer_cycles"], 1)
  regions = sorted(summary["regions"].items(), key=lambda kv: -kv[1]["cycles"])
  for name, r in regions:
    if not r["count"]:
      continue
    each = r["cycles"] / r["count"]
    share = "-" if name.startswith("p.") else f"{r['cycles'] / total:.3f}"
    rows.append(f"| {name} | {r['count'] / summary['blocks']:.2f} | {each:.0f} | {each / ghz / 1e3:.3f} | {share} |")
  return rows


@contextlib.contextmanager
def captured():
  """Mosaic GPU's profiler dumps summarized (`summarize`), not written as a Perfetto trace (its
  Python loop over every event takes minutes at 128K). Yields the list the summaries go to."""
  from jax.experimental.mosaic.gpu import profiler as mgpu_profiler
  got = []
  original = mgpu_profiler.ProfilerSpec.dump

  def dump(self, buffer, f, grid, block):
    traces = self._num_traces((), block)
    got.append(summarize(buffer, dict(self.interned_names), traces, self.entries_per_warpgroup))
    f.write("{}")
  mgpu_profiler.ProfilerSpec.dump = dump
  try:
    yield got
  finally:
    mgpu_profiler.ProfilerSpec.dump = original


def main(argv=None):
  import jax
  import jax.numpy as jnp

  from kernel_report import bench, rand
  from kernels import vs_pattern, vs_ranges_builder, vs_subset
  from vs_knobs import block_q, knobs
  from lcinfer.pallas_kernels import flash_mgpu

  ap = argparse.ArgumentParser()
  ap.add_argument("cases", nargs="*", default=["3500,100:no-far:hf,q56", "3500,100:no-far:hf",
                                                "3500,100:no-far:hf,k128", "30,800:no-far:hf", "dense:16384"])
  ap.add_argument("--space", type=int, default=1024, help="regions a warpgroup can record (truncated past it)")
  ap.add_argument("--ghz", type=float, default=1.98, help="SM clock for the us column")
  ap.add_argument("--reps", type=int, default=3)
  a = ap.parse_args(argv)
  h, d = 32, 128
  pdir = tempfile.mkdtemp(prefix="kprof")
  for case in a.cases:
    if case.startswith("dense:"):
      s = int(case.split(":")[1])
      kw, lay, cols = dict(block_k=128, heads_fastest=True), None, None
      ks = jax.random.split(jax.random.key(0), 3)
      q, k, v = (rand(kk, (1, s, h, d)) for kk in ks)
    else:
      spec, part, variant = (case.split(":") + ["all", "hf"])[:3]
      nv, ns = map(int, spec.split(","))
      s = 131072
      kw = knobs(variant)
      ks = jax.random.split(jax.random.key(0), 3)
      q, k, v = (rand(kk, (1, s, h, d)) for kk in ks)
      vert, sl = vs_subset(*vs_pattern(np.random.default_rng(0), s, h, nv, ns), part)
      lay, cols = jax.jit(vs_ranges_builder(s, vert.shape[-1], ns, block_q(variant), kw["block_k"]))(
          jnp.asarray(vert), jnp.asarray(sl))
    kw.setdefault("stages", 2)

    def run(q, k, v, lay, cols, profile=(), kw=kw):
      return flash_mgpu._run(q, k, v, lay, cols, scale=d ** -0.5, causal=True, profile=profile, **kw)[0]
    ms = bench(run, q, k, v, lay, cols, reps=a.reps)["ms"]
    with captured() as got:
      prof = jax.jit(lambda q, k, v, lay, cols: run(q, k, v, lay, cols, profile=(a.space, pdir)))
      prof(q, k, v, lay, cols).block_until_ready()
      jax.effects_barrier()
    if not got:
      print(f"kprof {case}: no profile captured", flush=True)
      continue
    summ = got[0]
    n = summ["blocks"]
    # what the clock reads cost: a CTA's mean consumer span profiled against the unprofiled kernel's
    # time per CTA slot (132 SMs, one CTA each at a time; the whole call's ms, so an upper bound)
    span_us = summ["consumer_cycles"] / (2 * n) / a.ghz / 1e3
    print(f"kprof {case}: {ms:.2f} ms a call unprofiled (<= {ms * 1e3 * 132 / n:.1f} us a CTA slot); "
          f"profiled consumer span {span_us:.1f} us a CTA; {n} CTAs, {summ['unpaired']} unpaired begins "
          f"(truncated traces: raise --space)", flush=True)
    for row in table(summ, a.ghz):
      print(f"kprof {case} {row}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
