"""The Hopper (Mosaic GPU) int4 flash-decoding kernel (pallas_kernels/decode_quant_mgpu.py).

wgmma has no interpret mode, so on CPU: its unpacking PTX against a numpy model of the
instructions, its lowering to Mosaic GPU for a CUDA target, and the dispatcher falling through to
the Triton kernel for calls it does not serve. The gpu-marked tests run it against the oracle."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_oracle, emulate_ptx
from lcinfer.pallas_kernels import decode_quant_mgpu as mq
from lcinfer.pallas_kernels import dispatch, quant
from lcinfer.pallas_kernels.decode_quant import quantized_decode_reference
from lcinfer.pallas_kernels.launch import hopper_device
from lcinfer.pallas_kernels.mgpu_int4 import int4_unpack_asm


def test_key_unpacking_ptx_makes_the_dequantized_values():
  """8 nibbles of a 32-bit word -> bf16 pairs: low nibbles of bytes 0..3 are channels c..c+3, the
  high ones channels c+D/2..; c * s + z rounded once."""
  rng = np.random.default_rng(1)
  n = 256
  raw = rng.integers(0, 256, (n, 4), dtype=np.uint8)
  inputs = {"$4": raw.view("<u4")[:, 0]}
  s = rng.uniform(0.01, 2.0, (n, 8)).astype(jnp.bfloat16)   # per output element (lo 0..3, hi 0..3)
  z = rng.uniform(-4.0, 4.0, (n, 8)).astype(jnp.bfloat16)
  for i in range(4):
    for arr, base in ((s, 5), (z, 9)):
      pair = arr[:, 2 * i: 2 * i + 2].view(np.uint16).astype(np.uint32)
      inputs[f"${base + i}"] = pair[:, 0] | (pair[:, 1] << 16)
  regs = emulate_ptx(int4_unpack_asm(), inputs, jnp.bfloat16)
  got = np.stack([regs[f"${i}"] for i in range(4)], axis=1)                     # [n, 4] words
  got = np.stack([got & 0xFFFF, got >> 16], axis=-1).reshape(n, 8).astype(np.uint16)
  got = got.view(jnp.bfloat16).astype(np.float64)
  codes = np.concatenate([raw & 0xF, raw >> 4], axis=1).astype(np.float64)      # lo 0..3, hi 0..3
  want = (codes * s.astype(np.float64) + z.astype(np.float64)).astype(jnp.bfloat16).astype(np.float64)
  np.testing.assert_array_equal(got, want)


def _layout_cells(layout, shape):
  """A model of a Mosaic GPU tiled layout, from its own tiling arithmetic (tile strides, register
  shape): {(register index, warp, lane, vector element): (row, col)}."""
  from jax.experimental.mosaic.gpu import utils as mu
  contig = mu.get_contiguous_strides(shape)
  strides = layout.tiling.tile_strides(contig)
  tts = layout.tiled_tiling_shape
  tail = strides[-len(tts):]

  def split(i, dims):  # a warp or lane id over its layout dims, the first the most significant
    sizes = [tts[d] for d in dims]
    out = [0] * len(tts)
    for d, st, n in zip(dims, mu.get_contiguous_strides(tuple(sizes)), sizes):
      out[d] = (i // st) % n
    return out

  cells = {}
  for w in range(4):
    for lane in range(32):
      base = sum(a * s for a, s in zip(split(w, layout.warp_dims), tail))
      base += sum(a * s for a, s in zip(split(lane, layout.lane_dims), tail))
      for reg in np.ndindex(layout.registers_shape(shape)):
        lin = base + sum(i * s for i, s in zip(reg, strides))
        for v in range(layout.vector_length):
          cells[(reg, w, lane, v)] = tuple(np.unravel_index(lin + v * tail[layout.vector_dim], shape))
  return cells


def test_register_key_tile_column_order_matches_the_layouts():
  """The key tile built in wgmma's A registers: code register (j, i) of the 8-bit layout unpacks to
  pairs p = low 01, low 23, high 01, high 23, placed in A register (a_column_tile(j, p), i). For every thread,
  the element at A column kappa must be channel key_channel_order[kappa] of the same key row, so
  that q[..., order] makes the product exact. Checked on both layouts' own tiling arithmetic."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from lcinfer.pallas_kernels.mgpu_int4 import a_column_tile, key_channel_order
  order = key_channel_order(64)
  assert sorted(order.tolist()) == list(range(128))
  codes = _layout_cells(fa.WGMMA_LAYOUT_8BIT, (64, 64))
  a_regs = _layout_cells(fa.WGMMA_LAYOUT, (64, 128))
  checked = 0
  for (reg, w, lane, v), (row, byte) in codes.items():
    for p, channel in ((v // 2, byte), (2 + v // 2, byte + 64)):   # low nibble, high nibble
      a_reg = (reg[0], a_column_tile(reg[1], p), *reg[2:])
      a_row, kappa = a_regs[(a_reg, w, lane, v % 2)]
      assert a_row == row and order[kappa] == channel, (reg, w, lane, v, p)
      checked += 1
  assert checked == 64 * 128


def _tma_code_tile(tile, swizzle):
  """A [keys, 64] uint8 code tile as TMA writes it into shared memory (CUDA's tensor-map swizzles):
  64-byte swizzle, one 64-byte row per key, 16-byte chunk c of row r at chunk c ^ (r // 2) % 4; or
  the wide tile, 128-byte rows of two keys (the [C / 2, 128] view of the codes), chunk c of row r at
  chunk c ^ r % 8."""
  smem = np.zeros(tile.size, np.uint8)
  for key, byte in np.ndindex(*tile.shape):
    if swizzle == 64:
      smem[64 * key + 16 * ((byte // 16) ^ ((key >> 1) & 3)) + byte % 16] = tile[key, byte]
    else:
      r, col = key // 2, 64 * (key % 2) + byte
      smem[128 * r + 16 * ((col // 16) ^ (r % 8)) + col % 16] = tile[key, byte]
  return smem


@pytest.mark.parametrize("swizzle", [64, 128])
def test_code_offsets_follow_the_tma_swizzle(swizzle):
  """`code_offset` (the addresses of the key tile's shared loads and of ldmatrix's rows) finds every
  code byte where TMA put it, for the 64-byte tile and the wide one; other swizzles are an error."""
  from lcinfer.pallas_kernels.mgpu_inline import _IntOps
  from lcinfer.pallas_kernels.mgpu_int4 import code_offset
  tile = np.random.default_rng(5).integers(0, 256, (128, 64), dtype=np.uint8)
  smem = _tma_code_tile(tile, swizzle)
  for key, byte in np.ndindex(*tile.shape):
    assert smem[code_offset(_IntOps, key, byte, swizzle)] == tile[key, byte], (key, byte)
  with pytest.raises(ValueError, match="swizzle"):
    code_offset(_IntOps, 0, 0, 32)


@pytest.mark.parametrize("swizzle", [64, 128])
def test_key_codes_by_ldmatrix_fill_the_8bit_layout(swizzle):
  """The key tile's two `ldmatrix.x4` per thread (rows at `key_ldmatrix_offsets`, fragments as the
  PTX ISA gives them: lane l gets word l % 4 of row l // 4 of each 8x8 b16 matrix) must hand every
  thread, in its register (j, rh), the four code bytes that Mosaic's 8-bit WGMMA layout puts
  there, for the 64-byte tile and the wide one."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from lcinfer.pallas_kernels.mgpu_int4 import key_ldmatrix_offsets
  tile = np.random.default_rng(9).integers(0, 256, (64, 64), dtype=np.uint8)
  smem = _tma_code_tile(tile, swizzle)
  offsets = key_ldmatrix_offsets(swizzle)
  got = {}
  for x, w in np.ndindex(2, 4):
    for i in range(4):
      mat = np.stack([smem[a:a + 16] for a in offsets[x, w, 8 * i:8 * i + 8]])   # [8 rows, 16 bytes]
      for lane in range(32):
        got[((0, 2 * x + i // 2, 0, 0, i % 2, 0, 0, 0, 0), w, lane)] = mat[lane // 4, 4 * (lane % 4):4 * (lane % 4) + 4]
  cells = _layout_cells(fa.WGMMA_LAYOUT_8BIT, (64, 64))
  for (reg, w, lane, v), (row, byte) in cells.items():
    assert got[(reg, w, lane)][v] == tile[row, byte], (reg, w, lane, v)
  assert len(cells) == 64 * 64


@pytest.mark.parametrize("swizzle", [64, 128])
def test_register_value_tile_rows_match_ldmatrix_and_the_layout(swizzle):
  """The value tile built in wgmma's A registers (V^T, [128, 64]) by two `ldmatrix.x4.trans` per
  thread and VALUE_UNPACK_ASM: for every thread, the element at A row R, key column kappa must be
  128 + the code of channel value_channel_order[R] of key kappa. Models: the TMA swizzle of the
  code tile (64 bytes, or the wide tile's 128), ldmatrix's transposed 8x8 b16 fragments (PTX ISA),
  the unpacking PTX (numpy), and the A layout from Mosaic's own tiling arithmetic."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from lcinfer.pallas_kernels.mgpu_int4 import VALUE_UNPACK_ASM, ldmatrix_row_offsets, value_channel_order
  order = value_channel_order(64)
  assert sorted(order.tolist()) == list(range(128))
  rng = np.random.default_rng(3)
  tile = rng.integers(0, 256, (64, 64), dtype=np.uint8)               # [key, byte]
  codes = np.concatenate([tile & 0xF, tile >> 4], axis=1)              # [key, channel]
  smem = _tma_code_tile(tile, swizzle)                                 # the tile as TMA writes it
  offsets = ldmatrix_row_offsets(64, swizzle)
  a_regs = _layout_cells(fa.WGMMA_LAYOUT, (128, 64))
  checked = 0
  for w in range(4):
    words = {}   # (x4 load, matrix i, lane) -> the 32-bit register ldmatrix.trans gives the lane
    for x, i in np.ndindex(2, 4):
      rows = [offsets[w, 8 * i + r] + 2048 * x for r in range(8)]      # lanes 8 i .. 8 i + 7 supply matrix i
      mat = np.stack([smem[a:a + 16].view("<u2") for a in rows])       # [8 keys, 8 byte pairs]
      for lane in range(32):
        lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
        words[(x, i, lane)] = int(lo) | (int(hi) << 16)
    for (x, i, lane), word in words.items():
      regs = emulate_ptx(VALUE_UNPACK_ASM, {"$4": np.array([word], np.uint32)}, jnp.bfloat16)
      for slot, (mt, rh) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        reg = (mt, 4 * x + i, 0, 0, rh, 0, 0, 0, 0)
        pair = np.array([regs[f"${slot}"][0] & 0xFFFF, regs[f"${slot}"][0] >> 16], np.uint16).view(jnp.bfloat16)
        for v in range(2):
          row, key = a_regs[(reg, w, lane, v)]
          assert float(pair[v]) == 128.0 + codes[key, order[row]], (w, lane, reg, v)
          checked += 1
  assert checked == 128 * 64


@pytest.mark.parametrize("rows,n_q,shift", [(4, 8, 0), (8, 8, 0), (12, 16, 0), (64, 64, 0), (4, 8, 4), (2, 8, 4)])
def test_query_tile_offsets_build_the_permuted_swizzled_tile(rows, n_q, shift):
  """`permute_queries_fn`'s addresses (numpy model): gathering raw query rows by them must give,
  for every row r and wgmma K index kappa, q[r - shift, key_channel_order[kappa]] (zero outside
  the rows) at the place TMA would have put element (r, kappa) of a [n_q, 128] tile: 8 x 64 tiles,
  128-byte swizzle. shift 4: block 1's query tile of the packed logits."""
  from lcinfer.pallas_kernels.mgpu_inline import query_tile_offsets
  from lcinfer.pallas_kernels.mgpu_int4 import key_channel_order
  rng = np.random.default_rng(5)
  raw = rng.integers(1, 1 << 15, (rows, 128)).astype(np.uint16)
  src, dst = query_tile_offsets(rows, n_q, shift)
  tile = np.zeros(n_q * 256, np.uint8)
  written = np.zeros(n_q * 256, bool)
  raw_bytes = raw.view(np.uint8).reshape(-1)
  for t, i in np.ndindex(src.shape[:2]):
    chunk = np.concatenate([raw_bytes[o:o + 4] if o >= 0 else np.zeros(4, np.uint8) for o in src[t, i]])
    assert not written[dst[t, i]:dst[t, i] + 16].any()
    tile[dst[t, i]:dst[t, i] + 16], written[dst[t, i]:dst[t, i] + 16] = chunk, True
  assert written.all()
  order = key_channel_order(64)
  want = np.zeros((n_q, 128), np.uint16)
  want[shift:shift + rows] = raw[:, order]
  for r, kappa in np.ndindex(n_q, 128):   # TMA's placement of (r, kappa): tiled (8, 64), 128-byte swizzle
    off = 1024 * (2 * (r // 8) + kappa // 64) + 128 * (r % 8) + 16 * (((kappa % 64) // 8) ^ (r % 8)) + 2 * (kappa % 8)
    assert tile[off:off + 2].view(np.uint16)[0] == want[r, kappa], (r, kappa)


@pytest.mark.parametrize("shape", [(64, 8), (128, 8)])
def test_column_halves_follow_the_lanes(shape):
  """The packed logits' inline helpers rest on the WGMMA layout of an 8-column tile (Mosaic's own
  tiling arithmetic): every element a thread holds is in column half (lane >> 1) & 1
  (`column_half_fn`), and lane ^ 2 holds, in the same register slot, the same row's column c ^ 4
  (`swap_column_halves_fn`'s shfl.bfly 2)."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  cells = _layout_cells(fa.WGMMA_LAYOUT, shape)
  for (reg, w, lane, v), (row, col) in cells.items():
    assert col // 4 == (lane >> 1) & 1, (reg, w, lane, v)
    assert cells[(reg, w, lane ^ 2, v)] == (row, col ^ 4), (reg, w, lane, v)
  assert len(cells) == shape[0] * shape[1]


def _inputs(b, t, h, kh, c, *, seed, holes=False, shuffled=False, kgroup=64, bad_row=False, trend=None):
  rng = np.random.default_rng(seed)
  d = 128
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  k = rng.standard_normal((b, kh, c, d)).astype(np.float32)
  if trend is not None:  # logits that grow or shrink along the cache: the running max moves often
    k *= np.linspace(*trend, c, dtype=np.float32)[:, None]
  k[..., 5] *= 8.0  # an outlier channel, as in real keys
  v = rng.standard_normal((b, kh, c, d)).astype(np.float32)
  k_q = quant.quantize(jnp.asarray(k), bits=4, axis="channel", group=kgroup, scale_dtype=jnp.bfloat16)
  v_q = quant.quantize(jnp.asarray(v), bits=4, axis="token", group=d, scale_dtype=jnp.bfloat16)
  pos = np.tile(np.arange(c, dtype=np.int32), (b, kh, 1))
  if holes:
    pos = np.where(rng.random(pos.shape) < 0.2, -1, pos)
  if shuffled:
    pos = np.stack([np.stack([rng.permutation(pos[i, j]) for j in range(kh)]) for i in range(b)])
  q_pos = np.tile(np.arange(c - t, c, dtype=np.int32), (b, 1))
  if bad_row:
    q_pos[-1, 0] = -1  # a padded query: sees nothing
  return q, k_q, v_q, jnp.asarray(pos), jnp.asarray(q_pos)


@pytest.mark.parametrize("t,h,kh,window,stages,lazy,sub,direct,warp,pair", [
    (1, 32, 8, None, 2, True, 2, False, False, False), (2, 32, 2, 100, 3, True, 2, False, False, False),
    (1, 64, 1, None, 2, False, 1, False, False, False), (2, 16, 2, None, 2, True, 1, False, False, False),
    (1, 32, 8, None, 2, True, 2, True, False, False), (1, 64, 1, 100, 2, True, 2, True, False, False),
    (1, 8, 8, None, 3, False, 1, True, False, False), (1, 32, 8, None, 2, True, 2, True, True, False),
    (2, 16, 2, 100, 3, True, 1, False, True, False), (1, 32, 8, None, 2, True, 2, True, False, True),
    (2, 32, 2, 100, 2, False, 2, False, True, True)])
@pytest.mark.parametrize("wide", [True, False])
def test_kernel_lowers_to_mosaic_gpu(t, h, kh, window, stages, lazy, sub, direct, warp, pair, wide):
  """Every construct lowers to Mosaic GPU for a CUDA target (no GPU needed): N = 8 (P stored
  transposed), 16, 32 and 64, the lazy and the every-block maximum, one or two blocks per stage,
  queries prepared in XLA or permuted in the kernel (q_direct), copies issued by one warp, a
  stage's two blocks through one product wait (pair), code tiles of 64-byte rows or wide ones."""
  q, k_q, v_q, pos, q_pos = _inputs(1, t, h, kh, 256, seed=0)

  def run(q, k_q, v_q, pos, q_pos):
    return mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=0.1, window=window, residual=None, num_splits=3,
                            block_k=64, num_stages=stages, lazy_max=lazy, sub=sub, q_direct=direct,
                            fused_combine=False, issue_warp=warp, pair=pair, wide=wide)
    # fused_combine=False: the combination is a Triton call, whose lowering needs a GPU (test_pallas_combine)
  text = jax.jit(run).trace(q, k_q, v_q, pos, q_pos).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("c,kgroup,meta,sub,stages", [
    (1024, 64, 4, None, 2), (1024, 128, 3, 1, 3), (640, 64, 2, None, 2), (1152, 192, 4, 1, 2),
    (1152, 192, 3, 1, 2)])
def test_per_key_row_chunks_lower_to_mosaic_gpu(c, kgroup, meta, sub, stages):
  """The per-key rows' own ring lowers for chunks of 2-4 stages, with key groups of one block, two
  blocks and three blocks (a chunk that starts inside a group copies one row more), and chunks that
  pass the end of a split or of the cache (the gpu tests run those)."""
  q, k_q, v_q, pos, q_pos = _inputs(1, 1, 32, 8, c, seed=0, kgroup=kgroup)

  def run(q, k_q, v_q, pos, q_pos):
    return mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=0.1, window=None, residual=None, num_splits=3,
                            block_k=64, num_stages=stages, sub=sub, meta=meta, fused_combine=False)
  text = jax.jit(run).trace(q, k_q, v_q, pos, q_pos).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("c,kgroup,meta,sub,rows", [
    (1024, 64, 4, None, 8), (1024, 128, 4, None, 4), (1152, 192, 4, 1, 3), (1152, 192, 3, 1, 1)])
def test_per_key_row_chunks_hold_every_group_they_touch(c, kgroup, meta, sub, rows):
  """A chunk of meta stages copies the key-scale rows of every group its keys touch, checked against
  the groups of each block of every chunk of every split."""
  q, k_q, *_ = _inputs(1, 1, 32, 8, c, seed=0, kgroup=kgroup)
  g = mq.geometry(q, k_q, scale=0.1, window=None, num_splits=3, block_k=64, num_stages=2, sub=sub, meta=meta)
  assert g.meta_rows == rows
  for split in range(g.splits):
    for first in range(split * g.blocks_per_split * 64, (split + 1) * g.blocks_per_split * 64, g.meta_keys):
      touched = {key // kgroup - first // kgroup for key in range(first, first + g.meta_keys, 64)}
      assert max(touched) < g.meta_rows


def test_stage_blocks_and_splits_hold_whole_stages():
  """Two blocks per TMA stage only where every split holds whole stages and a stage's key scales are
  one row or one row per block; an explicit request it cannot meet is a ValueError."""
  assert mq.stage_blocks(2048, 64, 64) == 2 and mq.stage_blocks(6, 64, 128) == 2
  assert mq.stage_blocks(3, 64, 64) == 1 and mq.stage_blocks(4, 64, 192) == 1
  q, k_q, v_q, pos, q_pos = _inputs(1, 1, 8, 2, 192, seed=0)   # 3 blocks
  with pytest.raises(ValueError, match="allow 1"):
    mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=0.1, window=None, residual=None, num_splits=2, block_k=64,
                     num_stages=2, sub=2)


@pytest.mark.parametrize("change,why", [
    (dict(kbits=8), "4/4"), (dict(kaxis="token"), "per channel"), (dict(kgroup=32), "multiple of 64"),
    (dict(vaxis="channel"), "per token"), (dict(h=128), "exceeds 64"),
    (dict(dtype=jnp.float16), "bfloat16"), (dict(scale_dtype=jnp.float32), "scales and zeros must be bfloat16")])
def test_calls_it_does_not_serve_say_why(change, why):
  c, h = change.get("c", 128), change.get("h", 8)
  d = 128
  x = jnp.ones((1, 1, c, d), jnp.float32)
  sdt = change.get("scale_dtype", jnp.bfloat16)
  k_q = quant.quantize(x, bits=change.get("kbits", 4), axis=change.get("kaxis", "channel"),
                       group=change.get("kgroup", 64 if change.get("kaxis", "channel") == "channel" else d),
                       scale_dtype=sdt)
  v_q = quant.quantize(x, bits=4, axis=change.get("vaxis", "token"), group=d if change.get("vaxis") is None else 32,
                       scale_dtype=sdt)
  q = jnp.ones((1, 1, h, d), change.get("dtype", jnp.bfloat16))
  assert why in mq.served(q, k_q, v_q, 64)
  served = (quant.quantize(x, bits=4, axis="channel", group=64, scale_dtype=jnp.bfloat16),
            quant.quantize(x, bits=4, axis="token", group=d, scale_dtype=jnp.bfloat16))
  assert mq.served(jnp.ones((1, 1, 8, d), jnp.bfloat16), *served, 64) is None  # the layout it serves


def test_dispatcher_falls_through_to_triton_off_hopper():
  """Interpret mode (or no Hopper GPU): "mosaic_gpu" says why and "triton" serves the call."""
  q, k_q, v_q, pos, q_pos = _inputs(1, 1, 8, 2, 128, seed=3, holes=True)
  with pytest.raises(dispatch.Unsupported, match="interpret"):
    mq.quantized_decode_attention_mgpu(q, k_q, v_q, pos, q_pos, scale=0.1, interpret=True)
  assert dispatch.implementations("quantized_decode_attention")[0] == "mosaic_gpu"
  out, lse = dispatch.call("quantized_decode_attention", None, q, k_q, v_q, pos, q_pos, scale=0.1, interpret=True)
  ref, ref_lse = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=0.1)
  assert_matches_oracle("fallthrough", out, lse, ref.astype(jnp.float32), ref_lse, "bfloat16")


# (name, b, t, h, kh, c, input options, kernel options)
CASES = [
    ("llama8b_like", 1, 1, 32, 8, 1024, {}, {}),
    ("window_two_queries", 2, 2, 16, 2, 640, dict(bad_row=True), dict(window=300)),
    ("holes_shuffled", 1, 1, 8, 4, 576, dict(holes=True, shuffled=True), dict(num_splits=3)),  # 9 blocks: sub 1
    ("rows_32", 1, 2, 32, 2, 1024, dict(holes=True), {}),
    ("rows_64_one_split", 1, 1, 64, 1, 256, {}, dict(num_splits=1, num_stages=3)),
    ("group_128", 2, 1, 8, 2, 384, dict(kgroup=128), dict(num_splits=2)),
    ("residual", 1, 3, 16, 4, 512, dict(holes=True), dict(residual=40)),
    ("residual_one_query", 2, 1, 16, 4, 512, dict(holes=True), dict(residual=40)),   # combine.py, then the merge
    # the lazy maximum: logits that rise along the cache (many rescales) or fall (few)
    ("rising_logits", 1, 1, 32, 8, 4096, dict(trend=(0.1, 6.0)), dict(num_splits=4)),
    ("falling_logits", 1, 2, 16, 4, 4096, dict(trend=(6.0, 0.1), holes=True), dict(num_splits=4)),
    # one query at G = 1 and 2 (packed logits by default)
    ("mha_one_query", 1, 1, 8, 8, 1024, {}, {}),
    ("g2_window_holes", 2, 1, 16, 8, 1024, dict(holes=True), dict(window=300)),
]


def _case_inputs(case):
  """A CASES entry's inputs on a Hopper GPU (else a skip): (q, k_q, v_q, pos, q_pos, kernel options),
  its `residual` count made into a bf16 window after the cache (the queries' positions past it)."""
  name, b, t, h, kh, c, opts, kw = case
  if hopper_device() is None:
    pytest.skip("needs a Hopper GPU")
  q, k_q, v_q, pos, q_pos = _inputs(b, t, h, kh, c, seed=zlib.crc32(name.encode()), **opts)
  kw = dict(kw)
  if kw.get("residual"):
    n, rng = kw["residual"], np.random.default_rng(7)
    rk, rv = (jnp.asarray(rng.standard_normal((b, kh, n, 128)), jnp.bfloat16) for _ in range(2))
    rp = jnp.asarray(np.tile(np.arange(c, c + n, dtype=np.int32), (b, kh, 1)))
    q_pos = q_pos + n
    kw["residual"] = (rk, rv, rp)
  return q, k_q, v_q, pos, q_pos, kw


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_gpu(case):
  name = case[0]
  q, k_q, v_q, pos, q_pos, kw = _case_inputs(case)
  out, lse = mq.quantized_decode_attention_mgpu(q, k_q, v_q, pos, q_pos, scale=128 ** -0.5, **kw)
  ref_kw = {key: val for key, val in kw.items() if key in ("window", "residual")}
  ref, ref_lse = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=128 ** -0.5, **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_matches_oracle(name, out, lse, ref.astype(jnp.float32), ref_lse, "bfloat16")
  via_dispatch, _ = dispatch.call("quantized_decode_attention", None, q, k_q, v_q, pos, q_pos,
                                  scale=128 ** -0.5, **kw)
  np.testing.assert_array_equal(np.asarray(via_dispatch, np.float32), np.asarray(out, np.float32))


@pytest.mark.parametrize("t,h,kh,window,sub,pair", [
    (1, 32, 8, None, 2, True), (2, 32, 2, 100, 2, True), (1, 64, 1, None, 2, False), (2, 16, 2, None, 1, False)])
def test_speculative_p_lowers_to_mosaic_gpu(t, h, kh, window, sub, pair):
  """Speculative P (the lazy maximum's P before the vote, the flags on the P fence, a redo after a
  rescale) lowers for N = 8 (P transposed), 16 and 64, a stage's two blocks paired or voting one
  after the other (alternate flags buffers), one block per stage."""
  q, k_q, v_q, pos, q_pos = _inputs(1, t, h, kh, 256, seed=0)

  def run(q, k_q, v_q, pos, q_pos):
    return mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=0.1, window=window, residual=None, num_splits=3,
                            block_k=64, num_stages=2, sub=sub, pair=pair, fused_combine=False)
  text = jax.jit(run).trace(q, k_q, v_q, pos, q_pos).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


SPEC_CASES = [c for c in CASES if not c[7].get("residual")]


def _matches_oracle_with_knobs_gpu(case, **knobs):
  """A CASES entry through `_dispatch_run` with `geometry` knobs, against the oracle (its residual,
  if any, merged after the kernel as the public call does)."""
  q, k_q, v_q, pos, q_pos, kw = _case_inputs(case)
  window, residual = kw.get("window"), kw.get("residual")
  ref, ref_lse = quantized_decode_reference(q, k_q, v_q, pos, q_pos, scale=128 ** -0.5, window=window,
                                            residual=residual)
  out, lse = mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=128 ** -0.5, window=window, residual=residual,
                              num_splits=kw.get("num_splits", 8), block_k=64, num_stages=kw.get("num_stages", 2),
                              **knobs)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_matches_oracle(case[0], out, lse, ref.astype(jnp.float32), ref_lse, "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [True, False])
@pytest.mark.parametrize("case", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_speculative_p_matches_oracle_gpu(case, pair):
  """Speculative P against the oracle, with pair (and packed logits where they apply) and with a
  stage's blocks voting in turn: a redo that missed a rescale (rising logits: many), a stale flag
  or a P tile not rewritten would show."""
  _matches_oracle_with_knobs_gpu(case, pair=pair)


@pytest.mark.gpu
@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("case", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_code_tile_rows_match_oracle_gpu(case, wide):
  """The code tiles as wide 128-byte rows of two keys (ldmatrix's rows at `code_offset` under the
  128-byte swizzle, the default) and as 64-byte rows, against the oracle: one block per stage (32
  rows), two (64), three stages, windows, holes."""
  _matches_oracle_with_knobs_gpu(case, wide=wide)


@pytest.mark.parametrize("h,kh,window,lazy", [(32, 8, None, True), (16, 8, 100, True), (8, 8, None, False)])
def test_packed_logits_lower_to_mosaic_gpu(h, kh, window, lazy):
  """The packed logit tile (a stage's two blocks in one [64, 8] tile) lowers for G = 4, 2 and 1,
  with a window, with the lazy maximum (speculative P) and the every-block maximum; asked for
  where it does not apply (G = 8, two queries, one block per stage), it is a clear error. It is the
  default exactly where it applies."""
  q, k_q, v_q, pos, q_pos = _inputs(1, 1, h, kh, 1024, seed=0)
  assert mq.geometry(q, k_q, scale=0.1, window=window, num_splits=3, block_k=64, num_stages=2).packed

  def run(q, k_q, v_q, pos, q_pos):
    return mq._dispatch_run(q, k_q, v_q, pos, q_pos, scale=0.1, window=window, residual=None, num_splits=3,
                            block_k=64, num_stages=2, fused_combine=False, packed=True, lazy_max=lazy)
  text = jax.jit(run).trace(q, k_q, v_q, pos, q_pos).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  for b, t, h_, kh_, sub in [(1, 1, 64, 8, None), (1, 2, 8, 4, None), (1, 1, 32, 8, 1)]:
    q2, k2, *_ = _inputs(b, t, h_, kh_, 1024, seed=0)
    with pytest.raises(ValueError, match="packed needs"):
      mq.geometry(q2, k2, scale=0.1, window=None, num_splits=3, block_k=64, num_stages=2, sub=sub, packed=True)
    assert not mq.geometry(q2, k2, scale=0.1, window=None, num_splits=3, block_k=64, num_stages=2, sub=sub).packed


PACKED_CASES = [c for c in CASES if c[2] == 1 and c[3] // c[4] <= 4 and c[0] != "holes_shuffled"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_unpacked_logits_match_oracle_gpu(case):
  """Where packed logits are the default (one query, G <= 4: G = 4, 2 and 1, windows, holes, rising
  logits, key groups of 128, the bf16 residual merged after), the unpacked tile (one block per
  [64, 8] logit tile) against the oracle; the default's packed tile runs in
  `test_kernel_matches_oracle_gpu`."""
  _matches_oracle_with_knobs_gpu(case, packed=False)


def test_triton_knobs_fall_through_and_misspelt_ones_fail():
  """A Triton knob that is set is not ignored by the Hopper kernels (Unsupported: the dispatcher
  moves on to Triton); a misspelt keyword is a TypeError, not silently dropped."""
  from lcinfer.pallas_kernels.flash_mgpu import flash_attention_mgpu
  q, k_q, v_q, pos, q_pos = _inputs(1, 1, 8, 2, 128, seed=4)
  with pytest.raises(dispatch.Unsupported, match="_poison"):
    mq.quantized_decode_attention_mgpu(q, k_q, v_q, pos, q_pos, scale=0.1, _poison=float("nan"))
  with pytest.raises(TypeError):
    mq.quantized_decode_attention_mgpu(q, k_q, v_q, pos, q_pos, scale=0.1, num_split=4)
  x = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(dispatch.Unsupported, match="num_warps"):
    flash_attention_mgpu(x, x, x, scale=0.1, num_warps=4)
  with pytest.raises(TypeError):
    flash_attention_mgpu(x, x, x, scale=0.1, blockq=64)
