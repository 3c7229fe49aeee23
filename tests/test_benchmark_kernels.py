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
