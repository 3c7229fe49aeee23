"""The Hopper (Mosaic GPU, wgmma) attention kernel, pallas_kernels/flash_mgpu.py.

Mosaic GPU has no CPU interpret mode for wgmma, so: on CPU, the kernel is lowered to Mosaic GPU IR
for a CUDA target (every Pallas-level construct must lower) and the range splitting it relies on
is checked against the key-set semantics; on an H100 (gpu-marked), outputs against the float32
oracles on fresh random inputs."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcinfer.pallas_kernels import dispatch, flash_mgpu
from lcinfer.pallas_kernels import flash_mgpu_inputs as mgpu_inputs
from lcinfer.pallas_kernels import flash_mgpu_kernel as kern
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.reference import attention_reference, block_sparse_reference
from lcinfer.pallas_kernels.sparse_index import BlockSparse
from lcinfer.pallas_kernels.sparse_index import Columns
from lcinfer.pallas_kernels.vertical_slash import (KeyRanges, canonicalize_ranges, ranges_key_mask,
                                                   vertical_slash_to_ranges)


def _qkv(rng, b, t, s, h, kh, d, dtype):
  dt = jnp.dtype(dtype)
  return tuple(jnp.asarray(rng.standard_normal(sh), dt) for sh in ((b, t, h, d), (b, s, kh, d), (b, s, kh, d)))


def _random_ranges(rng, b, h, t, bk, m, bq=flash_mgpu.TILE_Q):
  """User ranges at any offset: overlapping, empty, out of range, garbage past count, empty rows."""
  nq = -(-t // bq)
  start = rng.integers(-bk, t + bk, (b, h, nq, m)).astype(np.int32)
  end = start + rng.integers(-2, 2 * bk, (b, h, nq, m)).astype(np.int32)
  count = rng.integers(0, m + 1, (b, h, nq)).astype(np.int32)
  count[0, 0, -1] = 0
  return KeyRanges(jnp.asarray(count), jnp.asarray(start), jnp.asarray(end), bq, bk)


def _lowered(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("mode,t,h,kh,d,bq,bk,dtype", [
    ("causal", 384, 4, 1, 128, 128, 128, jnp.bfloat16),
    ("full", 200, 2, 2, 64, 128, 64, jnp.float16),
    ("ranges", 256, 4, 2, 128, 128, 64, jnp.bfloat16),
    ("ranges", 300, 2, 1, 128, 128, 128, jnp.bfloat16),   # block_k 128: narrow steps
    ("columns", 300, 2, 1, 128, 128, 128, jnp.bfloat16),
    ("ranges", 300, 2, 1, 64, 56, 64, jnp.bfloat16),     # split mode
    ("ranges", 336, 2, 1, 64, 56, 64, jnp.bfloat16),     # split mode, q and out not padded
    ("columns", 300, 2, 1, 128, 56, 64, jnp.bfloat16),
])
def test_kernel_lowers_to_mosaic_gpu(mode, t, h, kh, d, bq, bk, dtype):
  """Every construct of the kernel lowers to Mosaic GPU for a CUDA target (no GPU needed)."""
  q = jax.ShapeDtypeStruct((1, t, h, d), dtype)
  kv = jax.ShapeDtypeStruct((1, t, kh, d), dtype)
  layout = cols = None
  if mode == "ranges":
    layout = _random_ranges(np.random.default_rng(0), 1, h, t, bk, 3, bq)
  if mode == "columns":
    layout, cols = _vertical_slash(np.random.default_rng(0), h, t, bk, bq=bq)
  for heads_fastest, lazy_max in ((True, True), (False, True), (True, False)):
    run = lambda q, k, v, lay, cols: flash_mgpu._run(q, k, v, lay, cols, scale=0.1, causal=mode != "full",
                                                     block_k=bk, stages=2, heads_fastest=heads_fastest,
                                                     lazy_max=lazy_max)
    assert "mosaic_gpu" in _lowered(run, q, kv, kv, layout, cols)


def test_profiled_kernel_times_every_step_part(monkeypatch):
  """Geometry.profile: the split-mode vertical-slash kernel lowers with Mosaic GPU's profiler on, and
  each loop's step parts, the prologue / epilogue waits and the producer's slot waits are regions
  (`benchmarks/probes/kprof.py` reads them); without it, no profiler at all."""
  from jax.experimental.mosaic.gpu import profiler as mgpu_profiler
  names = []
  intern = mgpu_profiler.ProfilerSpec.intern_name
  monkeypatch.setattr(mgpu_profiler.ProfilerSpec, "intern_name", lambda self, n: (names.append(n), intern(self, n))[1])
  monkeypatch.setattr(jax.debug, "callback", lambda *a, **k: None)   # the trace dump: a host callback,
  t, h, d = 300, 2, 128                                              # which needs a CUDA backend to lower
  q = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 1, d), jnp.bfloat16)
  layout, cols = _vertical_slash(np.random.default_rng(0), h, t, 64, bq=flash_mgpu.SPLIT_Q)
  for profile in ((), (64, "/tmp/unused")):
    names.clear()
    run = lambda q, k, v, lay, cols, profile=profile: flash_mgpu._run(   # noqa: E731
        q, k, v, lay, cols, scale=0.1, causal=True, block_k=64, stages=2, heads_fastest=True, profile=profile)
    assert "mosaic_gpu" in _lowered(run, q, kv, kv, layout, cols)
    if not profile:
      assert names == []
  parts = ("wait_k", "qk", "softmax", "wait_v", "pv")
  kinds = ("shared", "shared_columns", "colmasked", "masked", "whole", "columns")
  want = {f"k:{kind}.{part}" for kind in kinds for part in parts + ("bias",) if (kind, part) != ("whole", "bias")}
  assert want | {"k:idle", "k:q_wait", "k:end_sync", "k:store_wait", "k:p.wait_free"} <= set(names)


@pytest.mark.parametrize("case,t,h,kh,bq,bk,nv,ns", [
    ("dense", 333, 4, 1, None, 128, 0, 0),          # odd length, GQA 4, a late-moving max (lazy rescales)
    ("ranges", 300, 2, 1, 56, 64, 0, 0),            # split mode, random ranges
    ("columns", 400, 2, 1, 128, 64, 25, 12),        # columns inside ranges (colmasked steps)
    ("columns", 400, 2, 1, 128, 128, 25, 12),       # narrow steps
    ("columns", 448, 2, 1, 56, 64, 100, 10),        # split: shared windows, shared column chunks, idle
])
def test_kernel_matches_oracle_in_interpret_mode(case, t, h, kh, bq, bk, nv, ns):
  """The Hopper kernel itself (every mode, the ring's barrier protocol) on CPU, in Mosaic GPU's
  interpret mode, against the float32 oracles: unwritten outputs would read NaN, out-of-bounds reads
  raise, every barrier phase must be observed; the split case also runs the race detector."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks   # race detector state (jax 0.11.2)
  import jax.experimental.pallas.mosaic_gpu as plgpu
  d = 64
  rng = np.random.default_rng(t + bk + nv)
  q, k, v = _qkv(rng, 1, t, t, h, kh, d, "bfloat16")
  if case == "dense":   # key j scaled up far from the diagonal: the max rises along the steps
    far = 1.0 + 30.0 * (1.0 - np.arange(t) / t)
    k = (k.astype(jnp.float32) * jnp.asarray(far, jnp.float32)[None, :, None, None]).astype(jnp.bfloat16)
  layout = cols = None
  if case == "ranges":
    layout = _random_ranges(rng, 1, h, t, bk, 6, bq)
  elif case == "columns":
    layout, cols = _vertical_slash(rng, h, t, bk, nv, ns, bq, max_cols=-(-nv // 16) * 16)
  races = bq == flash_mgpu.SPLIT_Q and cols is not None
  interpret = plgpu.InterpretGPUParams(detect_races=True) if races else True
  out, lse = flash_mgpu._run(q, k, v, layout, cols, scale=d ** -0.5, causal=True, block_k=bk, stages=2,
                             heads_fastest=True, interpret=interpret)
  if layout is None:
    ref, ref_lse = attention_reference(q, k, v, scale=d ** -0.5, causal=True, out_dtype=jnp.float32)
  else:
    ref, ref_lse = block_sparse_reference(q, k, v, layout, scale=d ** -0.5, columns=cols, out_dtype=jnp.float32)
  _close(case, out, lse, ref, ref_lse)
  if races:
    assert gpu_callbacks.get_races().races_found is False


def test_interpret_mode_needs_three_devices(monkeypatch):
  """With fewer host devices than warpgroups the interpreter deadlocks: a clear error instead."""
  monkeypatch.setattr(jax, "local_device_count", lambda *a: 2)
  q, k, v = _qkv(np.random.default_rng(0), 1, 128, 128, 2, 1, 64, "bfloat16")
  with pytest.raises(ValueError, match=">= 3 devices"):
    flash_mgpu._run(q, k, v, None, None, scale=0.1, causal=True, block_k=64, stages=2, heads_fastest=True,
                    interpret=True)


def _vertical_slash(rng, h, t, bk, nv=9, ns=6, bq=flash_mgpu.TILE_Q, max_cols=16):
  vert = rng.integers(0, t, (1, h, nv)).astype(np.int32)
  slash = rng.integers(0, t, (1, h, ns)).astype(np.int32)
  slash[:, :, :2] = [0, 1]
  return vertical_slash_to_ranges(jnp.asarray(vert), jnp.asarray(slash), t, bq, bk, 24, max_cols)


def _eqns(jaxpr):
  """The equations of a jaxpr and of the jaxprs nested in it (jit calls), not those of the kernel."""
  out = []
  for e in jaxpr.eqns:
    out.append(e)
    if e.primitive.name == "custom_vmap_call":
      continue
    for p in e.params.values():
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        out += _eqns(inner)
  return out


@pytest.mark.parametrize("t,bq,bk,copied", [
    (1024, 56, 64, False), (336, 56, 64, False),   # split mode: 8 | T, the last tile reads past T
    (1000, 128, 128, False), (300, 56, 64, True),  # 8 does not divide T: q is padded
    (100, 128, 64, True), (1024, 128, 128, False)])  # shorter than a tile: padded
def test_queries_and_outputs_are_not_copied(t, bq, bk, copied):
  """The wrapper pads q (and slices out) only where TMA cannot take the array as it is: below one
  tile or when 8 does not divide T; else the kernel reads and writes the caller's rows in place
  (on the 128K vertical-slash sets the padded copy of q and the sliced copy of out cost ~1.3 ms a
  call, H200). The GPU tests check the outputs at these lengths."""
  q = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.bfloat16)
  layout = _random_ranges(np.random.default_rng(0), 1, 2, t, bk, 3, bq)
  jaxpr = jax.make_jaxpr(lambda q, k, v, lay: flash_mgpu._run(q, k, v, lay, None, scale=0.1, causal=True,
                                                              block_k=bk, stages=2, heads_fastest=True))(
      q, kv, kv, layout)
  eqns = _eqns(jaxpr.jaxpr)
  kernel = [e for e in eqns if e.primitive.name == "custom_vmap_call"]   # plgpu.kernel's call
  pads_of_q = [e for e in eqns if e.primitive.name == "pad" and e.invars[0].aval.shape == (1, t, 2, 64)]
  assert bool(pads_of_q) == copied
  assert len(kernel) == 1, [e.primitive.name for e in eqns]
  out_rows = kernel[0].outvars[0].aval.shape[1]
  assert (out_rows == t) != copied


@pytest.mark.parametrize("t,bk,align", [(300, 64, 8), (256, 128, 8), (130, 32, 16)])
def test_aligned_split_keeps_the_key_set(t, bk, align):
  """canonicalize_ranges(align=8): same keys, disjoint, and each range inside one window
  [a, a + bk) with a % align == 0 (what the kernel loads)."""
  rng = np.random.default_rng(t + bk)
  b, h, bq = 2, 3, 128
  ranges = _random_ranges(rng, b, h, t, bk, 5)
  lo, hi, count, n_whole, _ = canonicalize_ranges(ranges, None, t, t, True, align)
  lo, hi, count, n_whole = (np.asarray(x) for x in (lo, hi, count, n_whole))
  want = np.asarray(ranges_key_mask(ranges, None, t, t, causal=True))
  keys = np.arange(t)
  for i in np.ndindex(*count.shape):
    got = np.zeros(t, bool)
    for j in range(count[i]):
      assert lo[i][j] < hi[i][j] and hi[i][j] <= lo[i][j] - lo[i][j] % align + bk, (i, j)
      assert not got[lo[i][j]:hi[i][j]].any(), "ranges overlap"
      got[lo[i][j]:hi[i][j]] = True
      whole = j < n_whole[i]
      assert whole == (hi[i][j] - lo[i][j] == bk and hi[i][j] - 1 <= i[2] * bq), (i, j)
    rows = slice(i[2] * bq, min((i[2] + 1) * bq, t))
    np.testing.assert_array_equal(got[None] & (keys[None] <= np.arange(t)[rows, None]), want[i[:2]][rows])


def _outside_band(c0, w, sa, sb):
  """A column chunk's slots [c0, c0 + w) the kernel keeps by its band mask: the band's slots [sa, sb)
  masked, the mask applied only to chunks that hold one of them."""
  slot = c0 + np.arange(w)
  if c0 < sb and c0 + w > sa:
    return (slot < sa) | (slot >= sb)
  return np.ones(w, bool)


def _stream_key_counts(meta, lo, hi, thr, colmap, srt, t, s, bk, bq=flash_mgpu.TILE_Q):
  """[B, H, T, S] how often the Hopper kernel's steps count each (row, key), from its inputs, by
  the kernel's rules: split mode's shared windows (each block's band keys in them) and shared column
  chunks (each block's thresholds, its band's slots masked), then list
  entries backwards (column-map ones, masked ones, then whole windows with no mask at all), then
  the column steps over the chunks outside [skip_from, skip_to). A meta row is a query block of bq
  rows (a tile, or in split mode one consumer's block)."""
  meta, lo, hi, thr, colmap, srt = (np.asarray(x) for x in (meta, lo, hi, thr, colmap, srt))
  b, h, nq, _ = meta.shape
  sp = colmap.shape[-1]
  counts = np.zeros((b, h, nq * bq, sp), np.int32)
  win = np.arange(bk)
  for bi, hi_, tile in np.ndindex(b, h, nq):
    fields = meta[bi, hi_, tile]
    n_list, n_whole, n_steps, last, n_colm = fields[[kern.M_COUNT, kern.M_WHOLE, kern.M_NCOLS, kern.M_LAST,
                                                     kern.M_COLMASKED]]
    sa, sb, skip_from, skip_to, ea, eb, at, n_shared = fields[[kern.M_SA, kern.M_SB, kern.M_SKIP_FROM,
                                                               kern.M_SKIP_TO, kern.M_EA, kern.M_EB,
                                                               kern.M_SHARED_AT, kern.M_SHARED_N]]
    rows = tile * bq + np.arange(bq)
    c = counts[bi, hi_, rows]                                       # [bq, Sp] view of the block
    for i in range(n_shared):
      w_lo = at + kern.SHARED * i
      start = min(w_lo, sp - kern.SHARED)
      keys = start + np.arange(kern.SHARED)
      keep = ((keys >= max(w_lo, ea)) & (keys < min(w_lo + kern.SHARED, eb)))[None] & (keys[None] <= rows[:, None])
      c[:, keys] += keep
    n_scol, scol_from, scol_to = fields[[kern.M_SCOL_N, kern.M_SCOL_FROM, kern.M_SCOL_TO]]
    for jj in range(n_scol):                                         # split: shared column chunks
      chunk = jj if jj < scol_from else jj + scol_to - scol_from
      slot = chunk * kern.SHARED + np.arange(kern.SHARED)
      keep = (slot[None] < thr[bi, hi_, rows][:, None]) & _outside_band(slot[0], kern.SHARED, sa, sb)[None]
      key = srt[bi, hi_, slot]
      assert not keep[:, key >= s].any(), "a padding slot of the list is attended"
      np.add.at(c, (slice(None), np.minimum(key, sp - 1)), keep)
    for j in range(n_list):
      e = n_list - 1 - j
      e_lo, e_hi = lo[bi, hi_, tile, e], hi[bi, hi_, tile, e]
      start = min(e_lo - e_lo % flash_mgpu.ALIGN, sp - bk)
      keys = start + win
      if j >= n_list - n_whole:                                      # whole: the window, unmasked
        keep = np.ones((len(rows), bk), bool)
      else:
        keep = ((keys >= e_lo) & (keys < e_hi))[None] & (keys[None] <= rows[:, None])
        if j < n_colm:
          keep &= ((colmap[bi, hi_, keys] == 0) | (keys > last))[None]
      c[:, keys] += keep
    for jj in range(n_steps):
      chunk = jj if jj < skip_from else jj + skip_to - skip_from
      slot = chunk * bk + win
      keep = (slot[None] < thr[bi, hi_, rows][:, None]) & _outside_band(slot[0], bk, sa, sb)[None]
      key = srt[bi, hi_, slot]
      assert not keep[:, key >= s].any(), "a padding slot of the list is attended"
      np.add.at(c, (slice(None), np.minimum(key, sp - 1)), keep)
    counts[bi, hi_, rows] = c
  return counts[:, :, :t, :s]


def test_count_below_matches_a_binary_search():
  """The wrapper's column counts (entries of an ascending list below x, from a 32-key bitmap and
  per-word prefix counts) against numpy's searchsorted, at word edges, 0, s and sp included."""
  rng = np.random.default_rng(11)
  b, h, n, s, sp = 2, 3, 70, 1000, 1024
  srt = np.full((b, h, n), s, np.int32)                     # unused slots: s
  for i in range(b):
    for j in range(h):
      m = rng.integers(0, n + 1)
      srt[i, j, :m] = np.sort(rng.choice(s, m, replace=False))
  srt[0, 0, :4] = [0, 31, 32, 63]                          # first and last bits of words
  x = np.concatenate([rng.integers(0, sp + 1, (b, h, 50)),
                      np.broadcast_to(np.array([0, 1, 31, 32, 33, 63, 64, s, sp]), (b, h, 9))], -1)
  at, every = mgpu_inputs._count_below(jnp.asarray(srt), s, sp)
  got = np.asarray(at(jnp.asarray(x.reshape(b, h, 1, -1))))
  want = np.stack([np.stack([np.searchsorted(srt[i, j][srt[i, j] < s], x[i, j]) for j in range(h)])
                   for i in range(b)])
  np.testing.assert_array_equal(got.reshape(want.shape), want)
  for upto in (1, 700, sp + 1, sp + 70):   # every x below upto, past the bitmap's last word too
    want = np.stack([np.stack([np.searchsorted(srt[i, j][srt[i, j] < s], np.arange(upto)) for j in range(h)])
                     for i in range(b)])
    np.testing.assert_array_equal(np.asarray(every(upto)), want)


@pytest.mark.parametrize("t,bq,bk,nv,near,n_far,seed,cap", [
    (1000, 128, 64, 40, 200, 6, 0, None), (1024, 128, 128, 30, 130, 4, 1, None), (700, 128, 64, 60, 3, 8, 2, None),
    (300, 128, 64, 5, 0, 3, 3, None), (1000, 56, 64, 40, 200, 6, 4, None), (700, 56, 64, 60, 3, 8, 5, None),
    (1000, 56, 64, 300, 200, 6, 6, None), (900, 56, 64, 150, 3, 8, 7, None),   # split, shared column chunks
    (700, 56, 64, 100, 3, 8, 8, 70)])   # a list cut at 70 columns, and blocks taking random shorter prefixes
def test_column_stream_counts_each_key_once(t, bq, bk, nv, near, n_far, seed, cap):
  """The inputs the wrapper builds for ranges + ascending columns make the kernel's steps count
  every key of the pattern exactly once and nothing else (emulated on CPU from those inputs): the
  band's columns by its ranges, unmasked where whole (the column steps skip their slots), the
  other columns by the column steps, ranges outside the band masking those they hold. bq 56: the
  split mode's per-consumer blocks, the block count padded to even, thr covering 8 rows more."""
  rng = np.random.default_rng(seed)
  h = 3
  vert = np.stack([rng.choice(t, nv, replace=False) for _ in range(h)])[None].astype(np.int32)
  far = np.stack([rng.choice(np.arange(near + 1, t), n_far, replace=False) for _ in range(h)])
  slash = np.concatenate([np.broadcast_to(np.arange(near + 1), (h, near + 1)), far], -1)[None].astype(np.int32)
  vert[0, :, :n_far] = t - 1 - far  # columns on far-slash keys: ranges outside the band hold them
  sp = -(-t // bk) * bk

  split = bq == flash_mgpu.SPLIT_Q
  _, nq, tp = mgpu_inputs._query_blocks(t, split)

  @jax.jit  # the wrapper's preparation, as `flash_mgpu._run` does it (one compile, not eager ops)
  def inputs(vert, slash):
    ranges, cols = vertical_slash_to_ranges(vert, slash, t, bq, bk, 4 * (n_far + 3) + t // bk, cap or max(64, nv))
    if cap:   # a block may take less than its rows reach (Columns' contract): the rows' counts must follow
      cols = dataclasses.replace(cols, count=jnp.minimum(cols.count, jnp.asarray(
          np.random.default_rng(seed).integers(0, cap, cols.count.shape), jnp.int32)))
    return (ranges, cols), mgpu_inputs._ranges_inputs(ranges, cols, jnp.zeros((1, sp, 1, 8)), t=t, s=t, h=h,
                                                     block_k=bk, causal=True, split=split)
  (ranges, cols), (meta, lo, hi, thr, colmap, srt) = inputs(jnp.asarray(vert), jnp.asarray(slash))
  assert not bool(jnp.any(ranges.saturated()))
  assert thr.shape[-1] == tp and meta.shape[2] == nq
  got = _stream_key_counts(meta, lo, hi, thr, colmap, srt, t, t, bk, bq)
  want = np.asarray(ranges_key_mask(ranges, cols, t, t, causal=True))
  np.testing.assert_array_equal(got, want.astype(np.int32))
  m = np.asarray(meta)
  band_slots = m[..., kern.M_SB] - m[..., kern.M_SA]
  assert band_slots.max() > 0 or near == 0, "the band held no column: the case is not exercised"
  assert m[..., kern.M_COLMASKED].max() > 0, "no range needed the column map: the case is not exercised"
  if split and near:
    assert m[..., kern.M_SHARED_N].max() > 0, "no tile shared its band: the case is not exercised"
  if split:   # lists of more than bk columns are walked in shared chunks, the others in own ones
    assert (m[..., kern.M_SCOL_N].max() > 0) == (nv > bk), "shared column chunks not as expected"
    assert not (m[..., kern.M_SCOL_N] * m[..., kern.M_NCOLS]).any(), "a block walks its columns twice"


def test_bad_calls_raise_clear_errors():
  rng = np.random.default_rng(1)
  q, k, v = _qkv(rng, 1, 128, 128, 2, 1, 64, "bfloat16")
  with pytest.raises(ValueError, match="block_k must be 64 or 128"):
    flash_mgpu.flash_attention_mgpu(q, k, v, scale=0.1, block_k=96)
  with pytest.raises(ValueError, match="stages"):
    flash_mgpu.flash_attention_mgpu(q, k, v, scale=0.1, stages=1)
  with pytest.raises(ValueError):  # mismatched shapes: the shared checks
    flash_mgpu.flash_attention_mgpu(q, k[:, :, :, :32], v, scale=0.1)
  with pytest.raises(dispatch.Unsupported, match="interpret"):
    flash_mgpu.flash_attention_mgpu(q, k, v, scale=0.1, interpret=True)
  if hopper_device() is None:
    with pytest.raises(dispatch.Unsupported, match="Hopper"):
      flash_mgpu.flash_attention_mgpu(q, k, v, scale=0.1)
  # a layout whose block_k the kernel lacks is a call it does not serve (not a bad call)
  layout = _random_ranges(rng, 1, 2, 128, 32, 3)
  with pytest.raises(dispatch.Unsupported, match="128x64, 128x128, 56x64"):
    flash_mgpu.block_sparse_attention_mgpu(q, k, v, layout, scale=0.1)
  for bq, bk in ((56, 128), (64, 64)):  # split mode is 56 x 64 only; 64-row tiles are not served
    with pytest.raises(dispatch.Unsupported, match=f"got {bq}x{bk}"):
      flash_mgpu.block_sparse_attention_mgpu(q, k, v, _random_ranges(rng, 1, 2, 128, bk, 3, bq), scale=0.1)
  out, _ = dispatch.call("block_sparse_attention", ("mosaic_gpu", "xla"), q, k, v, layout, scale=0.1)
  ref, _ = block_sparse_reference(q, k, v, layout, scale=0.1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # the dispatcher falls through to a kernel that serves the call
  out, _ = dispatch.call("flash_attention", ("mosaic_gpu", "xla"), q, k, v, scale=0.1, interpret=True)
  ref, _ = attention_reference(q, k, v, scale=0.1)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=1e-2)


def _close(name, out, lse, ref, ref_lse):
  out, lse, ref, ref_lse = (np.asarray(x, np.float32) for x in (out, lse, ref, ref_lse))
  assert np.isfinite(out).all(), f"{name}: non-finite output"
  empty = np.isneginf(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg=f"{name}: -inf rows differ")
  assert np.all(out[empty] == 0), name
  rel = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-6)
  assert rel < 1e-2, f"{name}: relative error {rel}"
  np.testing.assert_allclose(lse[~empty], ref_lse[~empty], atol=2e-2, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,kh,d,causal,bk,dtype", [
    (1024, 4, 1, 128, True, 128, "bfloat16"),
    (1000, 8, 2, 128, True, 64, "bfloat16"),    # odd length, GQA 4
    (333, 8, 1, 64, True, 128, "float16"),      # GQA 8, head_dim 64
    (640, 2, 2, 128, False, 128, "bfloat16"),
    (200, 4, 4, 64, False, 64, "bfloat16"),
])
def test_dense_matches_oracle_on_gpu(t, h, kh, d, causal, bk, dtype):
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(t + h + d)
  for b in (1, 2):
    q, k, v = _qkv(rng, b, t, t, h, kh, d, dtype)
    out, lse = flash_mgpu.flash_attention_mgpu(q, k, v, scale=d ** -0.5, causal=causal, block_k=bk)
    ref, ref_lse = attention_reference(q, k, v, scale=d ** -0.5, causal=causal, out_dtype=jnp.float32)
    _close(f"dense b={b}", out, lse, ref, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,kh,d,bq,bk", [
    (512, 4, 1, 128, 128, 128), (700, 8, 2, 64, 128, 64), (384, 2, 2, 128, 128, 64),
    (700, 8, 2, 128, 56, 64), (333, 4, 1, 64, 56, 64), (168, 2, 2, 128, 56, 64)])   # split mode
def test_ranges_and_blocks_match_oracle_on_gpu(t, h, kh, d, bq, bk):
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(t * 7 + bk + bq)
  b = 2
  q, k, v = _qkv(rng, b, t, t, h, kh, d, "bfloat16")
  ranges = _random_ranges(rng, b, h, t, bk, 6, bq)
  out, lse = flash_mgpu.block_sparse_attention_mgpu(q, k, v, ranges, scale=d ** -0.5)
  ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=d ** -0.5, out_dtype=jnp.float32)
  _close("ranges", out, lse, ref, ref_lse)
  nq, nk = -(-t // bq), -(-t // bk)
  blocks = BlockSparse(jnp.asarray(rng.integers(0, 5, (b, h, nq)), jnp.int32),
                       jnp.asarray(rng.integers(-1, nk + 1, (b, h, nq, 4)), jnp.int32), bq, bk)
  out, lse = dispatch.call("block_sparse_attention", ("mosaic_gpu",), q, k, v, blocks, scale=d ** -0.5)
  ref, ref_lse = block_sparse_reference(q, k, v, blocks, scale=d ** -0.5, out_dtype=jnp.float32)
  _close("blocks", out, lse, ref, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,kh,d,bq,bk,nv,ns", [
    (1024, 4, 1, 128, 128, 128, 40, 30), (700, 8, 2, 64, 128, 64, 25, 12),
    (1024, 4, 1, 128, 56, 64, 40, 30), (999, 8, 2, 64, 56, 64, 70, 12),     # split mode
    (1024, 4, 2, 128, 56, 64, 300, 20)])   # split mode, shared column chunks on most tiles
def test_vertical_slash_with_columns_matches_oracle_on_gpu(t, h, kh, d, bq, bk, nv, ns):
  """Ranges + the ascending shared column list (columns inside ranges counted once), and an
  unsorted list falling through the dispatcher to the Triton kernel."""
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(t + nv)
  q, k, v = _qkv(rng, 1, t, t, h, kh, d, "bfloat16")
  ranges, cols = _vertical_slash(rng, h, t, bk, nv, ns, bq, max_cols=16 if nv <= 70 else -(-nv // 16) * 16)
  assert cols.ascending
  out, lse = flash_mgpu.block_sparse_attention_mgpu(q, k, v, ranges, scale=d ** -0.5, columns=cols)
  ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=d ** -0.5, columns=cols,
                                        out_dtype=jnp.float32)
  _close("vertical-slash", out, lse, ref, ref_lse)
  unsorted = Columns(cols.count, jnp.flip(cols.index, -1))
  with pytest.raises(dispatch.Unsupported, match="ascending"):
    flash_mgpu.block_sparse_attention_mgpu(q, k, v, ranges, scale=d ** -0.5, columns=unsorted)
  if bq == flash_mgpu.SPLIT_Q:  # Triton tiles are powers of two: 56-row lists are not its calls
    return
  out, lse = dispatch.call("block_sparse_attention", ("mosaic_gpu", "triton"), q, k, v, ranges,
                           scale=d ** -0.5, columns=unsorted)
  ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=d ** -0.5, columns=unsorted,
                                        out_dtype=jnp.float32)
  _close("unsorted columns via triton", out, lse, ref, ref_lse)


@pytest.mark.gpu
def test_profiled_kernel_gives_the_same_output_on_gpu(tmp_path):
  """Geometry.profile only reads clocks: the split-mode vertical-slash kernel's output is the same
  with the profiler on, and the probe's summary of the run has every CTA's steps in it."""
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  import sys
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "probes"))
  import kprof
  t, h, d = 1000, 4, 128
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 1, t, t, h, 1, d, "bfloat16")
  ranges, cols = _vertical_slash(rng, h, t, 64, 40, 60, flash_mgpu.SPLIT_Q, max_cols=48)
  run = lambda profile: flash_mgpu._run(q, k, v, ranges, cols, scale=d ** -0.5, causal=True, block_k=64,  # noqa: E731
                                        stages=2, heads_fastest=True, profile=profile)
  plain = run(())
  with kprof.captured() as got:
    profiled = run((256, str(tmp_path)))
    jax.block_until_ready(profiled)
    jax.effects_barrier()
  for a, b in zip(plain, profiled):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  (summary,) = got
  n_tiles = -(-t // (2 * flash_mgpu.SPLIT_Q)) * h
  assert summary["blocks"] == n_tiles and summary["unpaired"] == 0
  regions = summary["regions"]
  assert regions["q_wait"]["count"] == 2 * n_tiles and regions["store_wait"]["count"] == 2 * n_tiles
  assert regions["shared.qk"]["count"] > 0 and regions["shared.qk"]["cycles"] > 0


@pytest.mark.gpu
def test_narrow_steps_match_oracle_on_gpu():
  """block_k 128 ranges with narrow (64-key) steps for the ranges that fit a 64-key window: random
  ranges at any offset, and vertical-slash with columns."""
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(23)
  t, h, kh, d = 1000, 4, 2, 128
  q, k, v = _qkv(rng, 2, t, t, h, kh, d, "bfloat16")
  run = lambda lay, cols: flash_mgpu._run(q, k, v, lay, cols, scale=d ** -0.5, causal=True, block_k=128,  # noqa: E731
                                          stages=2, heads_fastest=True, narrow=True)
  ranges = _random_ranges(rng, 2, h, t, 128, 8)
  out, lse = run(ranges, None)
  ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=d ** -0.5, out_dtype=jnp.float32)
  _close("narrow ranges", out, lse, ref, ref_lse)
  q, k, v = (x[:1] for x in (q, k, v))
  ranges, cols = _vertical_slash(rng, h, t, 128, nv=40, ns=20)
  out, lse = run(ranges, cols)
  ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=d ** -0.5, columns=cols, out_dtype=jnp.float32)
  _close("narrow vertical-slash", out, lse, ref, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("growth", [30.0, -0.97])
def test_running_max_moves_late_on_gpu(growth):
  """Lazy maximum: logits that rise (or fall) by far more than 2^LAZY_TAU along the order the steps
  visit keys (the diagonal first, columns last), dense and vertical-slash with columns."""
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(17)
  t, h, d = 1000, 4, 128
  q, k, v = _qkv(rng, 1, t, t, h, 2, d, "bfloat16")
  far = 1.0 + growth * (1.0 - np.arange(t) / t)       # key j scaled by far[j]: large far from the diagonal
  k = (k.astype(jnp.float32) * jnp.asarray(far, jnp.float32)[None, :, None, None]).astype(jnp.bfloat16)
  out, lse = flash_mgpu.flash_attention_mgpu(q, k, v, scale=d ** -0.5, block_k=64)
  ref, ref_lse = attention_reference(q, k, v, scale=d ** -0.5, out_dtype=jnp.float32)
  _close(f"dense growth={growth}", out, lse, ref, ref_lse)
  for bq in (flash_mgpu.TILE_Q, flash_mgpu.SPLIT_Q):
    ranges, cols = _vertical_slash(rng, h, t, 64, nv=40, ns=12, bq=bq)
    out, lse = flash_mgpu.block_sparse_attention_mgpu(q, k, v, ranges, scale=d ** -0.5, columns=cols)
    ref, ref_lse = block_sparse_reference(q, k, v, ranges, scale=d ** -0.5, columns=cols, out_dtype=jnp.float32)
    _close(f"vertical-slash {bq} rows, growth={growth}", out, lse, ref, ref_lse)


def test_mosaic_gpu_comes_first_and_falls_through():
  """Default order: mosaic_gpu, triton, ..., xla; a call it cannot serve (here: interpret mode on
  CPU) runs on the next implementation, the same result as asking for that one."""
  for op in ("flash_attention", "block_sparse_attention"):
    order = dispatch.implementations(op)
    assert order[:2] == ("mosaic_gpu", "triton") and order[-1] == "xla"
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 1, 40, 40, 2, 1, 64, "float32")
  got, _ = dispatch.call("flash_attention", None, q, k, v, scale=0.125, interpret=True)
  want, _ = dispatch.call("flash_attention", ("triton",), q, k, v, scale=0.125, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
