"""Quantized KV-cache layouts read by the flash-decoding kernel, with their pure-jnp quantizer and
float32 dequantizer (the oracle side).

Asymmetric uniform quantization (KIVI, Liu et al. 2024, Sec. 3: x ~ code * scale + zero with
scale = (max - min) / (2^b - 1), zero = min over the group, code = round((x - zero) / scale) in
[0, 2^b - 1]), in two groupings of a cache tensor x [B, K, C, D]:
  * axis="token":   one (scale, zero) per token and group of `group` channels  -> [B, K, C, D / group]
                    (KIVI's per-token values; group = D is plain per-token quantization);
  * axis="channel": one (scale, zero) per channel and group of `group` tokens  -> [B, K, C / group, D]
                    (KIVI's per-channel keys, which isolates the outlier channels of keys).
Codes are packed into uint8 as "bit planes over channel ranges": with f = 8 / bits values per byte,
byte j of a token holds channel j + i * (D / f) in bits [i * bits, (i + 1) * bits), i < f. A
contiguous channel range then comes from one contiguous byte range and one shift, which is how the
kernel unpacks it (static ref slices; no interleave in registers).
bits: 8, 4 or 2. The full-precision residual window of recent tokens (KIVI keeps the last R tokens
unquantized) is a separate ordinary bf16 cache; `quantized_decode_attention` merges the two by lse.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BITS = (8, 4, 2)
AXES = ("token", "channel")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A quantized [B, K, C, D] cache tensor: codes uint8 [B, K, C, D * bits / 8]; scale and zero
  [B, K, C, D / group] (axis="token") or [B, K, C / group, D] (axis="channel"), float."""
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True), default=4)
  axis: str = dataclasses.field(metadata=dict(static=True), default="token")
  group: int = dataclasses.field(metadata=dict(static=True), default=128)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """The logical (dequantized) shape [B, K, C, D]."""
    b, k, c, nbytes = self.codes.shape
    return (b, k, c, nbytes * 8 // self.bits)

  @property
  def per_byte(self) -> int:
    return 8 // self.bits


def check_quant_params(bits, axis, group, c: int, d: int) -> None:
  """ValueError for a layout that cannot exist (wrong for every implementation)."""
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
  if axis not in AXES:
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
  if not isinstance(group, int) or isinstance(group, bool) or group < 1:
    raise ValueError(f"group must be a positive int, got {group!r}")
  if d % (8 // bits):
    raise ValueError(f"head_dim {d} must be a multiple of {8 // bits} to pack {bits}-bit codes")
  n, what = (d, "head_dim") if axis == "token" else (c, "the cache length C")
  if n % group:
    raise ValueError(f"group {group} must divide {what} ({n}) for axis={axis!r}")


def check_quantized(qt: QuantizedTensor, name: str = "tensor") -> tuple[int, int, int, int]:
  """Validate a QuantizedTensor's shapes and dtypes; returns its logical shape."""
  if qt.codes.ndim != 4 or qt.codes.dtype != jnp.uint8:
    raise ValueError(f"{name}.codes must be a uint8 [B, K, C, D*bits/8] array, got {qt.codes.dtype} "
                     f"{tuple(qt.codes.shape)}")
  if qt.bits not in BITS:
    raise ValueError(f"{name}.bits must be one of {BITS}, got {qt.bits!r}")
  b, k, c, d = qt.shape
  check_quant_params(qt.bits, qt.axis, qt.group, c, d)
  want = (b, k, c, d // qt.group) if qt.axis == "token" else (b, k, c // qt.group, d)
  for part in ("scale", "zero"):
    x = getattr(qt, part)
    if tuple(x.shape) != want:
      raise ValueError(f"{name}.{part} must be {want} for axis={qt.axis!r}, group={qt.group}; got "
                       f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}.{part} must be a float array, got {x.dtype}")
  return b, k, c, d


def _group_view(x, axis, group):
  """x [B, K, C, D] -> a view whose axis -1 is the group: [B, K, C, D/g, g] or [B, K, C/g, g, D]."""
  b, k, c, d = x.shape
  if axis == "token":
    return x.reshape(b, k, c, d // group, group), -1
  return x.reshape(b, k, c // group, group, d), -2


def quantize(x_BKCD, *, bits: int = 4, axis: str = "token", group: int | None = None,
             scale_dtype=jnp.float32) -> QuantizedTensor:
  """Asymmetric round-to-nearest quantization of a cache tensor (module docstring). group defaults
  to D (axis="token") or 32 tokens (axis="channel"). Constant groups get scale 1 (exact)."""
  b, k, c, d = x_BKCD.shape
  if group is None:
    group = d if axis == "token" else 32
  check_quant_params(bits, axis, group, c, d)
  x = x_BKCD.astype(jnp.float32)
  xg, red = _group_view(x, axis, group)
  lo = jnp.min(xg, axis=red, keepdims=True)
  hi = jnp.max(xg, axis=red, keepdims=True)
  levels = (1 << bits) - 1
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  # round the statistics to their storage dtype first, so that codes are computed against the
  # scale and zero the kernel will read
  scale = scale.astype(scale_dtype).astype(jnp.float32)
  lo = lo.astype(scale_dtype).astype(jnp.float32)
  codes = jnp.clip(jnp.round((xg - lo) / scale), 0, levels).astype(jnp.uint8).reshape(b, k, c, d)
  f = 8 // bits
  planes = codes.reshape(b, k, c, f, d // f)                   # plane i: channels i*D/f + j
  shifts = (jnp.arange(f, dtype=jnp.uint8) * bits)[:, None]
  packed = jnp.sum(planes.astype(jnp.uint32) << shifts.astype(jnp.uint32), axis=3).astype(jnp.uint8)
  sq = jnp.squeeze(scale, red).astype(scale_dtype)
  zq = jnp.squeeze(lo, red).astype(scale_dtype)
  return QuantizedTensor(packed, sq, zq, bits, axis, group)


def unpack_codes(qt: QuantizedTensor):
  """uint8 codes [B, K, C, D] (one value per element) from the packed planes."""
  b, k, c, nbytes = qt.codes.shape
  f = qt.per_byte
  mask = jnp.uint8((1 << qt.bits) - 1)
  planes = [(qt.codes >> jnp.uint8(i * qt.bits)) & mask for i in range(f)]
  return jnp.concatenate(planes, axis=-1)                      # plane i holds channels i*D/f + j


def dequantize(qt: QuantizedTensor):
  """float32 [B, K, C, D]: code * scale + zero."""
  codes = unpack_codes(qt).astype(jnp.float32)
  b, k, c, d = codes.shape
  cg, red = _group_view(codes, qt.axis, qt.group)
  scale = jnp.expand_dims(qt.scale.astype(jnp.float32), red)
  zero = jnp.expand_dims(qt.zero.astype(jnp.float32), red)
  return (cg * scale + zero).reshape(b, k, c, d)


def nbytes(qt: QuantizedTensor) -> int:
  """Bytes the tensor occupies (codes + scale + zero)."""
  return sum(int(x.size) * x.dtype.itemsize for x in (qt.codes, qt.scale, qt.zero))
