"""Rotary position embeddings (RoFormer, Su et al. 2021, eq. 34) with HF's context-extension variants.

  theta_i = base^(-2i/d)        (default)
  linear  : theta_i / factor                                   (Position Interpolation, Chen et al. 2023)
  dynamic : base' = base * (factor * L / L0 - (factor - 1))^(d / (d - 2)), L = longest position + 1
  llama3  : per-wavelength blend of theta_i and theta_i / factor (Llama 3.1 report)
  yarn    : NTK-by-parts ramp between theta_i and theta_i / factor, cos/sin scaled by
            0.1 ln(factor) + 1 (Peng et al. 2023, eqs. 19-23)
  longrope: theta_i / lambda_i with lambda = short_factor or long_factor (Ding et al. 2024), cos/sin
            scaled by sqrt(1 + ln(factor) / ln(L0))

The rotation is HF's rotate-half layout: x * cos + rotate_half(x) * sin on the first rotary_dim
channels. "dynamic" and "longrope" depend on the longest position of the call, exactly as
transformers' `dynamic_rope_update` does, taken per row (so a row of a batch gets what it would get
alone, as in HF with batch 1), and generation matches HF token for token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcinfer.config import ModelConfig, RopeConfig


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
  exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


def _llama3(rope: RopeConfig, dim: int) -> np.ndarray:
  inv = _base_inv_freq(rope.theta, dim)
  factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
  old = rope.original_max_position_embeddings
  low_wavelen, high_wavelen = old / lo, old / hi
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
  base, factor = rope.theta, rope.factor
  orig = rope.original_max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  att = rope.attention_factor
  if att is None:
    if rope.mscale and rope.mscale_all_dim:
      att = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
    else:
      att = mscale(factor)
  beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

  def corr_dim(rot):
    return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

  low, high = corr_dim(beta_fast), corr_dim(beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
  extrap, interp = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
  extrap_factor = 1 - ramp
  inv = interp * (1 - extrap_factor) + extrap * extrap_factor
  return inv.astype(np.float32), float(att)


def _longrope_attention_factor(rope: RopeConfig) -> float:
  if rope.attention_factor is not None:
    return float(rope.attention_factor)
  factor = rope.factor
  if factor is None or factor <= 1.0:
    return 1.0
  return math.sqrt(1 + math.log(factor) / math.log(rope.original_max_position_embeddings))


def inv_freq_for_call(config: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, float]:
  """Inverse frequencies, [rotary_dim/2] or per row [B, rotary_dim/2] (float32), and the cos/sin scale.

  Static types are constants; dynamic and longrope read each row's longest position (pad = -1).
  """
  rope, dim = config.rope, config.rotary_dim
  kind = rope.rope_type
  if kind == "default":
    return jnp.asarray(_base_inv_freq(rope.theta, dim)), 1.0
  if kind == "linear":
    return jnp.asarray(_base_inv_freq(rope.theta, dim) / np.float32(rope.factor)), 1.0
  if kind == "llama3":
    return jnp.asarray(_llama3(rope, dim)), 1.0
  if kind == "yarn":
    inv, att = _yarn(rope, dim)
    return jnp.asarray(inv), att
  seq_len = (jnp.max(positions_BT, axis=1) + 1)[:, None]  # [B, 1]; pads are -1
  if kind == "dynamic":
    max_pos = config.max_position_embeddings
    L = jnp.maximum(seq_len, max_pos).astype(jnp.float32)
    f = jnp.float32(rope.factor)
    base = jnp.float32(rope.theta) * ((f * L / max_pos) - (f - 1)) ** (dim / (dim - 2))
    exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return (1.0 / (base ** exps[None, :])).astype(jnp.float32), 1.0
  if kind == "longrope":
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base_pow = np.float32(rope.theta) ** exps
    short = (1.0 / (np.asarray(rope.short_factor, np.float32) * base_pow)).astype(np.float32)
    long = (1.0 / (np.asarray(rope.long_factor, np.float32) * base_pow)).astype(np.float32)
    use_long = seq_len > rope.original_max_position_embeddings
    return jnp.where(use_long, jnp.asarray(long), jnp.asarray(short)), _longrope_attention_factor(rope)
  raise NotImplementedError(kind)  # unreachable: RopeConfig validates rope_type


def rope_cos_sin(config: ModelConfig, positions_BT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, rotary_dim] in `dtype`, HF layout (the half-frequencies repeated twice)."""
  inv, scale = inv_freq_for_call(config, positions_BT)
  pos = jnp.maximum(positions_BT, 0).astype(jnp.float32)
  freqs = pos[..., None] * (inv[:, None, :] if inv.ndim == 2 else inv[None, None, :])
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x_BTHD: jax.Array, cos_BTd: jax.Array, sin_BTd: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin on the first rotary_dim channels; the rest pass through."""
  rd = cos_BTd.shape[-1]
  x_rot, x_pass = x_BTHD[..., :rd], x_BTHD[..., rd:]
  half = rd // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos_BTd[:, :, None, :], sin_BTd[:, :, None, :]
  out = x_rot * cos + rotated * sin
  return out if x_pass.shape[-1] == 0 else jnp.concatenate([out, x_pass], axis=-1)
