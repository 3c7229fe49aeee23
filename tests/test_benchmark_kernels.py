"""The kernel benchmark's plumbing on CPU (--smoke: tiny shapes, Pallas interpret mode), so that a
device run is not spent discovering a broken script. Timings here mean nothing and are not checked."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernels  # noqa: E402


def test_smoke_run_writes_results(tmp_path):
  assert kernels.main(["--smoke", "--out", str(tmp_path)]) == 0
  data = json.loads((tmp_path / "kernels-cpu-smoke.json").read_text())
  rows = data["rows"]
  errors = [r for r in rows if "error" in r]
  assert not errors, errors
  sections = {r.get("section") for r in rows}
  assert {"dense", "block_sparse", "vertical_slash", "decode"} <= sections
  for r in rows:
    if r.get("section") in ("block_sparse", "vertical_slash"):
      assert 0 < r["density"] <= 1
  quantized = [r for r in rows if r.get("section") == "decode" and r["cache"] != "bf16"]
  assert quantized and all(r["x_against"] > 0 for r in quantized)   # paired with the bf16 call's samples
  md = (tmp_path / "kernels-cpu-smoke.md").read_text()
  assert "## Vertical-slash" in md and "## Decode attention" in md


def test_unknown_vertical_slash_variant_fails_before_any_run(tmp_path):
  """A misspelt --vs-variants row would silently vanish from the table: it stops the run at once,
  naming the rows that exist (and the device step's own list is all known rows)."""
  with pytest.raises(SystemExit, match="unknown \\['exact mosaic_gpu 128x96'\\].*'exact mosaic_gpu 128x128'"):
    kernels.main(["--smoke", "--only", "vertical_slash", "--out", str(tmp_path),
                  "--vs-variants", "exact mosaic_gpu 128x128,exact mosaic_gpu 128x96"])
  assert not list(tmp_path.iterdir())
  step = (ROOT / "benchmarks/probes/device_call.sh").read_text().split("    exact)")[1].split(";;")[0]
  rows = step.split('--vs-variants "${arg:-')[1].split('}"')[0].replace("\\\n", "").split(",")
  assert len(rows) == 9 and set(rows) <= set(kernels.vs_variant_names()), rows


def test_vertical_slash_density_is_exact():
  """vs_density against a brute-force count of the causal (q, k) pairs the pattern selects."""
  import numpy as np

  rng = np.random.default_rng(0)
  s = 120
  vert, sl = kernels.vs_pattern(rng, s, 3, 35, 70)
  want = []
  for c, o in zip(vert[0], sl[0]):
    q = np.arange(s)[:, None]
    k = np.arange(s)[None, :]
    sel = (k <= q) & (np.isin(k, c) | np.isin(q - k, o))
    want.append(sel.sum() / (s * (s + 1) / 2))
  assert abs(kernels.vs_density(vert, sl, s) - np.mean(want)) < 1e-12


def test_vertical_slash_list_sizes_never_truncate():
  """The benchmark's list sizes hold every piece of BENCHMARKS.md's patterns: building with twice
  the room gives the same lists, and no list is full (a full one may have dropped far slashes)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lcinfer.pallas_kernels.sparse_index import vertical_slash_to_layout
  from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges
  s, h = 8192, 2
  rng = np.random.default_rng(0)
  for nv, ns in ((30, 800), (1000, 6096), (100, 800)):
    vert, sl = (jnp.asarray(x) for x in kernels.vs_pattern(rng, s, h, nv, ns))
    for bq, bk in ((128, 64), (56, 64)):   # 56x64: the Hopper kernel's split mode (the default layout)
      max_ranges, max_blocks = kernels.vs_list_sizes(ns, bq, bk)
      builds = [(vertical_slash_to_ranges, max_ranges)]
      if bq != 56:   # aligned blocks come in powers of two
        builds.append((vertical_slash_to_layout, max_blocks))
      for build, size in builds:
        def lists(v, s_, n, build=build):   # the list lengths, and whether any list is full
          lay = build(v, s_, s, bq, bk, n, 1024)[0]
          return lay.count, lay.saturated().any()
        lists = jax.jit(lists, static_argnums=2)
        count, full = lists(vert, sl, size)
        assert not bool(full), (nv, ns, bq, bk, build.__name__)
        np.testing.assert_array_equal(count, lists(vert, sl, 2 * size)[0])


def test_spans_per_call_cut_the_timeline_between_runs():
  """spans_per_call on a synthetic timeline: 3 runs of an executable of 2 calls (4 events each,
  short gaps inside, long host gaps between runs), against spans computed by hand."""
  from kernel_report import spans_per_call
  events, t, want = [], 0, []
  for run, (dur, inner_gap) in enumerate(((10_000, 300), (12_000, 0), (9_000, 2_500))):
    start = t
    for i in range(4):
      events.append((t, t + dur))
      t += dur + inner_gap
    want.append((t - inner_gap - start) * 1e-9 / 2)
    t += 60_000 + 10_000 * run   # the host's dispatch between synced runs
  got = spans_per_call(events, runs=3, copies=2)
  assert np.allclose(got, want, rtol=0, atol=1e-15), (got, want)
  with pytest.raises(ValueError, match="missed kernels"):
    spans_per_call(events[:2], runs=3, copies=2)


def test_device_time_only_where_there_is_a_gpu():
  """On CPU the profiler's trace has no GPU plane: no device time (not a made-up one); on a GPU a
  positive one."""
  import jax
  import jax.numpy as jnp
  from kernel_report import device_time, prepare_in_jit
  compiled, cargs, _, _ = prepare_in_jit(lambda x: jnp.sin(x) * 2, jnp.ones((64, 64)), copies=2)
  ms = device_time(compiled, cargs, copies=2, runs=2)
  assert (ms is None) if jax.default_backend() == "cpu" else (ms > 0)


def test_table_density_is_benchmarks_md_column():
  """table_density against BENCHMARKS.md itself: its density column (0.108 / 0.013 / 0.055 / 0.014)
  and MInference's efficiencies quoted there (65% on (1000, 6096), 37% on (3500, 100), from 38.6 and
  34.5 ms against 232.6 ms of cuDNN dense) come out of it."""
  from kernel_report import table_density, vs_efficiencies
  s = 131072
  for (nv, ns), want in {(1000, 6096): 0.108, (30, 800): 0.013, (3500, 100): 0.055, (100, 800): 0.014}.items():
    assert round(table_density(nv, ns, s), 3) == want, (nv, ns)
  for (nv, ns), ms, eff in (((1000, 6096), 38.6, 0.65), ((3500, 100), 34.5, 0.37)):
    row = {"v": nv, "s": ns, "S": s, "speedup": 232.6 / ms, "efficiency": 0.5}
    pairs, nominal = vs_efficiencies(row)
    assert pairs == 0.5 and round(nominal, 2) == eff, (nv, ns, nominal)
  assert vs_efficiencies({"v": 30, "s": 800, "S": s, "error": "x"}) == (None, None)   # a failed row


def test_rerender_keeps_notes_and_rewrites_tables(tmp_path):
  """rerender rebuilds a result file's tables from its .json and keeps the hand-written text above
  them; a .md without a table section raises and is left as it was."""
  from kernel_report import rerender
  row = {"name": "vs", "section": "vertical_slash", "ms": 23.0, "S": 131072, "v": 3500, "s": 100,
         "kv_heads": 32, "density": 0.028, "layout": "ranges mosaic_gpu", "block": "56x64", "speedup": 11.0,
         "efficiency": 0.308}
  info = {"device": "GPU", "date": "d", "jax": "0.11.2", "python": "3.12"}
  (tmp_path / "r.json").write_text(json.dumps({"info": info, "command": "cmd", "rows": [row]}))
  note = "# old header\n\n**Note.** kept by hand.\n"
  (tmp_path / "r.md").write_text(note + "\n## Vertical-slash (old)\n\n| stale |\n")
  text = rerender(tmp_path / "r.json")
  assert text.startswith(note) and "stale" not in text
  line = next(x for x in text.splitlines() if x.startswith("| (3500, 100)"))
  assert "| 0.055 |" in line and "| 0.308 |" in line and "| 0.604 |" in line   # 2 * 3600 / 131072 * 11.0
  (tmp_path / "r.md").write_text("no tables here\n")
  with pytest.raises(ValueError, match="no '## ' table section"):
    rerender(tmp_path / "r.json")
  assert (tmp_path / "r.md").read_text() == "no tables here\n"


def test_l2_probe_kernels_read_what_they_say():
  """The L2 probe's Triton fold (interpret mode) equals its jnp reference, so its rate counts bytes
  that were read; programs > blocks wraps around; the TMA reader lowers to Mosaic GPU and, in its
  interpret mode, ends holding the block its walk ends on."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
  import l2_probe

  x = jax.random.bits(jax.random.key(3), (40, l2_probe.ROW_WORDS), jnp.uint32).astype(jnp.int32)
  for programs, rows, unroll, n_steps in ((3, 8, 2, 2), (7, 16, 1, 3)):   # 5 blocks, 2 blocks
    kw = dict(programs=programs, rows=rows, unroll=unroll, n_steps=n_steps)
    got = l2_probe.triton_read(x, num_warps=4, num_stages=1, interpret=True, **kw)
    want = l2_probe.fold_reference(x, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # the reference against a numpy walk of program 1's blocks (1, 4, 2, 0: stride 3 mod 5 blocks)
  xn = np.asarray(x)
  acc = np.zeros((8, l2_probe.ROW_WORDS), np.int32)
  for blk in (1, 4, 2, 0):
    acc ^= xn[blk * 8:(blk + 1) * 8]
  want = l2_probe.fold_reference(x, programs=3, rows=8, unroll=2, n_steps=2)
  np.testing.assert_array_equal(np.asarray(want)[1], acc.sum(0, dtype=np.int32))
  x16 = jax.lax.bitcast_convert_type(x, jnp.bfloat16).reshape(40, 2 * l2_probe.ROW_WORDS)
  f = lambda y: l2_probe.tma_read(y, programs=2, rows=8, n_steps=5, stages=2)   # noqa: E731
  assert "mosaic_gpu" in jax.jit(f).trace(x16).lower(lowering_platforms=("cuda",)).as_text()
  # run in Mosaic GPU's interpret mode: CTA p's last block is (p + 4 * 2) mod 5 (blocks of 8 rows)
  import jax.experimental.pallas.mosaic_gpu as plgpu
  got = np.asarray(l2_probe.tma_read(x16, programs=2, rows=8, n_steps=5, stages=2,
                                     interpret=plgpu.InterpretGPUParams()))
  x16n = np.asarray(x16)
  for p in range(2):
    blk = (p + 4 * 2) % 5
    np.testing.assert_array_equal(got[8 * p:8 * p + 8], x16n[8 * blk:8 * blk + 8])


def test_far_slash_bytes_counts_the_union_of_windows():
  """far_slash_bytes' per-tile union of key windows against a brute-force set of (tile, key) rows,
  with slashes close enough to overlap inside a tile, one past the start, and a short last tile."""
  sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
  import far_slash_bytes as fsb

  s = 203
  for offsets, n in (([0, 5, 9, 60, 150], 16), ([3, 40, 41, 200], 32), ([7], 64), ([1, 2, 100], 7)):
    want = 0
    for q0 in range(0, s, n):
      keys = {i - o for i in range(q0, min(q0 + n, s)) for o in offsets if i - o >= 0}
      want += len(keys)
    assert fsb.window_union_rows(offsets, s, n) == want
    assert fsb.pair_rows(offsets, s) == sum(s - o for o in offsets)


def test_far_slash_whole_call_bound(tmp_path):
  """The whole-call bound by hand: 9.9 GB at 9.9 TB/s is 1 ms; with 2 ms of rest one after the other
  3 ms against a 4 ms budget at 65% is 0.65 x 4 / 3 (0.65 x 4 / 2 with the rest at twice the rate);
  overlapped, 1/4 of the L2 ceiling and 2/4 of the tensor rate. The table has a row per design, and
  its serial bound never falls as the query rows sharing the loads grow."""
  sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
  import far_slash_bytes as fsb

  got = fsb.whole_call_bound(9.9, 2.0, 4.0, 9.9)
  assert got == pytest.approx({"far_ms": 1.0, "serial_eff": 0.65 * 4 / 3, "l2_frac": 0.25, "tensor_frac": 0.5})
  assert fsb.whole_call_bound(9.9, 2.0, 4.0, 9.9, rest_scale=0.5)["serial_eff"] == pytest.approx(0.65 * 4 / 2)
  out = tmp_path / "bound.md"
  assert fsb.main(["--sets", "30,100", "--tiles", "64", "--s", "4096", "--heads", "2", "--out", str(out)]) == 0
  rows = [r for r in out.read_text().splitlines() if r.startswith("| (30, 100) | ")]
  assert len(rows) == 1 + len(fsb.DESIGNS)
  serial = [float(r.split(" | ")[5].split(" / ")[0]) for r in rows[1:]]
  assert serial == sorted(serial)             # larger shared tiles read less, so never a worse bound


def test_diag_l2_model_counts_reads_and_misses():
  """diag_l2_model's LRU: every (row, diagonal) pair read once; with a cache larger than the keys every
  distinct row misses once and the order cannot matter; with a one-row cache nearly every read misses;
  a tiny case against a hand-run LRU trace."""
  sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
  import diag_l2_model as m

  offs, s = np.asarray([3, 70, 71, 150, 400]), 260
  pairs = sum(s - o for o in offs if o < s)
  rows = len({i - o for o in offs for i in range(o, s)})
  for desc in (False, True):
    assert m.l2_misses(offs, s, programs=3, l2_rows=10 ** 6, descending=desc) == (pairs, rows)
    reads, misses = m.l2_misses(offs, s, programs=3, l2_rows=1, descending=desc)
    assert reads == pairs and misses > 0.9 * reads
  # one block of 4 rows, offsets 1 and 2, one a step, an LRU of 2: rows 0,1,2 then 0,1 (keys i - o >= 0):
  # 0 1 2 miss; 0 misses (evicted by 2), 1 misses (evicted by 0)
  assert m.l2_misses(np.asarray([1, 2]), 4, programs=1, l2_rows=2, descending=False, block_q=4,
                     per_step=1) == (5, 5)
  assert m.l2_misses(np.asarray([1, 2]), 4, programs=1, l2_rows=3, descending=False, block_q=4,
                     per_step=1) == (5, 3)


def test_kprof_summarizes_profiler_buffers():
  """kprof.summarize on a buffer laid out as Mosaic GPU's profiler writes it (per trace: start, SM,
  entries used, then (tag, clock) pairs; an end tag has bit 31 set): regions paired per trace,
  other names (Mosaic's own "Init") skipped, a 32-bit clock wrap, a truncated trace's lone begin
  counted as unpaired, the producer (last trace of a block) outside the consumer spans."""
  sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
  import kprof

  names = {"Init": 0, "k:a.wait_k": 1, "k:a.qk": 2, "k:p.wait_free": 3, "other": 4}
  end = kprof.EXIT
  wrap = 2 ** 32
  traces = {   # (block, warpgroup): [(tag, clock)]
      (0, 0): [(0, wrap - 400), (0 | end, wrap - 390), (1, wrap - 380), (1 | end, wrap - 350), (2, wrap - 350),
               (2 | end, wrap - 300), (1, wrap - 6), (1 | end, 10)],
      (0, 1): [(2, 0), (4, 5), (4 | end, 7), (2 | end, 30)],   # "other" nested inside: dropped, a.qk still paired
      (0, 2): [(3, 5), (3 | end, 9)],
      (1, 0): [(1, 0)],                                        # truncated: its end was dropped
  }
  e = kprof.HEADER + 2 * 8
  buf = np.zeros((2, 3, e), np.uint64)
  for (blk, wg), evs in traces.items():
    buf[blk, wg, 2] = 2 * len(evs)
    for i, (tag, clk) in enumerate(evs):
      buf[blk, wg, kprof.HEADER + 2 * i:kprof.HEADER + 2 * i + 2] = (tag, clk % wrap)
  got = kprof.summarize(buf.astype(np.uint32).ravel(), names, 3, e)
  assert got["regions"] == {"a.wait_k": {"count": 2, "cycles": 30 + 16}, "a.qk": {"count": 2, "cycles": 50 + 30},
                            "p.wait_free": {"count": 1, "cycles": 4}}
  assert got["blocks"] == 2 and got["unpaired"] == 1
  assert got["consumer_cycles"] == (400 + 10) + 30   # block 0's two consumer spans; block 1: one event, 0
  rows = kprof.table(got, ghz=1.0)
  assert rows[2].startswith("| a.qk | 1.00 | 40 | 0.040 | 0.182 |")   # 80 of 440 consumer cycles
  assert any(r.startswith("| p.wait_free |") and r.endswith("| - |") for r in rows)
