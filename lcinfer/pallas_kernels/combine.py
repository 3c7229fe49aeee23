"""The split-K combination of flash-decoding (Dao et al. 2023, "Flash-Decoding"): partial outputs
o_s and log-sum-exps l_s of S cache splits merged exactly,

    m = max_s l_s,   w_s = exp(l_s - m),   out = sum_s w_s o_s / sum_s w_s,   lse = m + log sum_s w_s,

as one Triton-lowered Pallas kernel that also writes the final [B, 1, H, D] layout, for one query
per row (T = 1) with G = H / K a power of two. `combine_splits` (jnp, here) is the reference and
serves every other call; `finish_rows` picks between them for the kernels that write [B, K, S, R, D]
partials (the bf16 and Triton quantized decodes).

Why a kernel: at decode the combination is launch-bound. XLA makes three kernels of the jnp version
(weights, weighted sum, cast / layout), 8-12 us of GPU time on an H200 at 128K for ~1 MB of data
(ncu, session 11), next to a 52 us int4 decode kernel.

Layout: o_part [B, K, S_pad, G_pad, D] ("rows") or [B, K, S_pad, D, G_pad] ("channels": the Mosaic
int4 kernel's O^T), lse_part [B, K, S_pad, G_pad]; only the first S splits and G rows are read
(masked loads), so padded splits and rows may hold anything. S_pad must be a multiple of
`split_chunk(G)` (`padded_splits`): a program walks the splits in chunks of that many with a running
maximum. interleave16: the partial's channels come in `mgpu_int4.value_channel_order` (within
each 16 channels, the even ones then the odd ones); they are put back in order before the store.
Grid (B, K, D / channels): each program owns `channels` (32, or 16 / 8) channels of one kv head's G
rows. The int4 Hopper decode's O^T partials take 16 (H200, 128K, K = 8: 1.72 us of GPU time against
1.96 at 32, `benchmarks/probes/combine_probe.py`); the bf16 decode's rows read the same at 16 and 32
(1.43 / 1.44 us) and keep 32.
NaN partials stay NaN (the poisoned-output tests rely on it); rows every split left empty give
out 0 and lse -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lcinfer.pallas_kernels.launch import triton_call

CHANNELS = 32        # channels per program (the default; `combine_partials` takes 16 or 8 too)
TILE = 8192          # float32 elements of one loaded chunk (64 per thread at 4 warps)


def served(t: int, g: int, d: int) -> bool:
  """Whether the kernel serves T queries of G heads per kv head at head_dim d."""
  return t == 1 and g & (g - 1) == 0 and g <= TILE // CHANNELS and d % CHANNELS == 0


def split_chunk(g: int) -> int:
  """Splits per loaded chunk: as many as fit TILE with 32 channels of G rows, at most 64."""
  return max(1, min(64, TILE // (CHANNELS * g)))


def padded_splits(splits: int, g: int) -> int:
  """The split count a producer allocates so that the chunks tile it (`split_chunk`): the next power
  of two up to one chunk, whole chunks past it."""
  chunk = split_chunk(g)
  if splits <= chunk:
    return max(1, 1 << (splits - 1).bit_length())
  return -(-splits // chunk) * chunk


def from_kv_head_rows(out_BKRD, lse_BKR, t: int):
  """The inverse of `kv_head_rows` on (out [B, K, G*T, D], lse [B, K, G*T]) -> ([B, T, H, D], [B, T, H])."""
  b, kh, rows, d = out_BKRD.shape
  g = rows // t
  out = jnp.transpose(out_BKRD.reshape(b, kh, g, t, d), (0, 3, 1, 2, 4)).reshape(b, t, kh * g, d)
  lse = jnp.transpose(lse_BKR.reshape(b, kh, g, t), (0, 3, 1, 2)).reshape(b, t, kh * g)
  return out, lse


def combine_splits(o_BKSRD, lse_BKSR, rows: int):
  """Exact lse-weighted combination over the split axis (2) of the first `rows` rows (the kernels
  leave padded rows unwritten): -> (out [B, K, rows, D] f32, lse [B, K, rows])."""
  o_BKSRD, lse_BKSR = o_BKSRD[:, :, :, :rows], lse_BKSR[:, :, :, :rows]
  m = jnp.max(lse_BKSR, axis=2, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_BKSR - m)                  # empty split: exp(-inf) = 0
  den = jnp.sum(w, axis=2)
  empty = den == 0                           # (a NaN, e.g. an unwritten partial, stays NaN)
  den_safe = jnp.where(empty, 1.0, den)
  out = jnp.sum(w[..., None] * o_BKSRD, axis=2) / den_safe[..., None]
  lse = jnp.where(empty, -jnp.inf, m[:, :, 0] + jnp.log(den_safe))
  return out, lse


def allocated_splits(splits: int, t: int, g: int, d: int) -> int:
  """The split count a producer allocates its partial buffers with: padded for the kernel where it
  serves the call (`padded_splits`), else the splits themselves."""
  return padded_splits(splits, g) if served(t, g, d) else splits


def finish_rows(o_BKSRD, lse_BKSR, *, splits: int, t: int, g: int, out_dtype, interpret: bool = False):
  """Partials [B, K, S_alloc, R, D] / [B, K, S_alloc, R] (S_alloc = `allocated_splits`) -> (out
  [B, T, H, D] out_dtype, lse [B, T, H] float32): the kernel where it serves the call, else jnp."""
  if served(t, g, o_BKSRD.shape[-1]):
    return combine_partials(o_BKSRD, lse_BKSR, splits=splits, g=g, layout="rows", out_dtype=out_dtype,
                            interpret=interpret)
  out, lse = from_kv_head_rows(*combine_splits(o_BKSRD, lse_BKSR, g * t), t)
  return out.astype(out_dtype), lse


def _kernel(o_ref, lse_ref, out_ref, lse_out_ref, *, splits, chunk, g, channels_major, interleave16, channels):
  c = pl.program_id(2)
  n_chunks = -(-splits // chunk)

  def body(i, carry):
    m, den, acc = carry
    s0 = i * chunk
    s_ok = s0 + lax.broadcasted_iota(jnp.int32, (chunk, g), 0) < splits          # [chunk, G]
    l = pltriton.load(lse_ref.at[pl.ds(s0, chunk), pl.ds(0, g)], mask=s_ok, other=-jnp.inf)
    if channels_major:   # [chunk, channels, G]
      o = pltriton.load(o_ref.at[pl.ds(s0, chunk), pl.ds(c * channels, channels), pl.ds(0, g)],
                        mask=jnp.broadcast_to(s_ok[:, None, :], (chunk, channels, g)), other=0.0)
    else:                # [chunk, G, channels] -> [chunk, channels, G]
      o = pltriton.load(o_ref.at[pl.ds(s0, chunk), pl.ds(0, g), pl.ds(c * channels, channels)],
                        mask=jnp.broadcast_to(s_ok[:, :, None], (chunk, g, channels)), other=0.0)
      o = jnp.transpose(o, (0, 2, 1))
    m_new = jnp.maximum(m, jnp.max(l, axis=0))                                     # [G]
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # all empty so far: weights exp(-inf) = 0
    alpha = jnp.exp(m - m_safe)
    w = jnp.exp(l - m_safe[None, :])                                               # [chunk, G]
    den = den * alpha + jnp.sum(w, axis=0)
    acc = acc * alpha[None, :] + jnp.sum(w[:, None, :] * o, axis=0)                # [channels, G]
    return m_new, den, acc

  init = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
          jnp.zeros((channels, g), jnp.float32))
  m, den, acc = lax.fori_loop(0, n_chunks, body, init)
  empty = den == 0.0
  den_safe = jnp.where(empty, 1.0, den)
  out = acc / den_safe[None, :]                                                    # [channels, G]
  if interleave16:   # row 16j + 8e + p holds channel 16j + 2p + e
    out = jnp.transpose(out.reshape(channels // 16, 2, 8, g), (0, 2, 1, 3)).reshape(channels, g)
  out_ref[...] = jnp.transpose(out).astype(out_ref.dtype)                         # [G, channels]
  lse_out_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(den_safe))


@functools.partial(jax.jit, static_argnames=("splits", "g", "layout", "interleave16", "out_dtype", "interpret",
                                             "channels", "num_warps"))
def combine_partials(o_part, lse_part, *, splits: int, g: int, layout: str, interleave16: bool = False,
                     out_dtype=jnp.bfloat16, interpret: bool = False, channels: int = CHANNELS, num_warps: int = 4):
  """(o_part, lse_part) of S = `splits` splits (module docstring) -> (out [B, 1, K*G, D] out_dtype,
  lse [B, 1, K*G] float32). channels: output channels per program (32, 16, or 8 without interleave16)."""
  if layout not in ("rows", "channels"):
    raise ValueError(f"layout must be 'rows' or 'channels', got {layout!r}")
  if channels not in (8, 16, 32) or (interleave16 and channels < 16):
    raise ValueError(f"channels must be 32, 16 or 8 (at least 16 with interleave16), got {channels}")
  channels_major = layout == "channels"
  b, kh, s_pad = o_part.shape[:3]
  d = o_part.shape[3] if channels_major else o_part.shape[4]
  if not served(1, g, d) or s_pad != padded_splits(splits, g):
    raise ValueError(f"combine_partials: G = {g}, D = {d}, {s_pad} allocated splits for {splits} "
                     f"(needs G a power of two, D a multiple of {channels}, and "
                     f"padded_splits({splits}, {g}) = {padded_splits(splits, g)} allocated)")
  chunk = min(split_chunk(g), s_pad)
  o_block = (None, None, s_pad, d, o_part.shape[4]) if channels_major else (None, None, s_pad, o_part.shape[3], d)
  kernel = functools.partial(_kernel, splits=splits, chunk=chunk, g=g, channels_major=channels_major,
                             interleave16=interleave16, channels=channels)
  out, lse = triton_call(
      kernel, [o_part, lse_part], grid=(b, kh, d // channels),
      in_specs=[pl.BlockSpec(o_block, lambda bi, ki, ci: (bi, ki, 0, 0, 0)),
                pl.BlockSpec((None, None, s_pad, lse_part.shape[3]), lambda bi, ki, ci: (bi, ki, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, g, channels), lambda bi, ki, ci: (bi, ki, 0, ci)),
                 pl.BlockSpec((None, None, g), lambda bi, ki, ci: (bi, ki, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kh, g, d), out_dtype), jax.ShapeDtypeStruct((b, kh, g), jnp.float32)],
      num_warps=num_warps, num_stages=1, interpret=interpret, name="lcinfer_combine_splits")
  return out.reshape(b, 1, kh * g, d), lse.reshape(b, 1, kh * g)
