"""Parameter-only building blocks in HF layout: Linear weights are [out, in] as torch stores them,
so checkpoint conversion is a name map with no transposes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lcinfer.precision import precision_for


class Linear(nnx.Module):
  """y = x W^T + b with W [out, in] (torch.nn.Linear layout)."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool, axes: tuple[str, str], dtype,
               rngs: nnx.Rngs, std: float = 0.02):
    self.weight = nnx.Param(
        (std * jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)).astype(dtype),
        logical_axes=axes)
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[0],)) if bias else None

  def __call__(self, x):
    w = self.weight[...]
    y = jnp.einsum("...i,oi->...o", x, w, precision=precision_for(w.dtype))
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w, normalised in float32 and cast
  back before the scale, as transformers' LlamaRMSNorm does."""

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return self.weight[...] * (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


class Embedding(nnx.Module):
  def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs, std: float = 0.02):
    self.weight = nnx.Param(
        (std * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype),
        logical_axes=("vocab", "embed"))

  def __call__(self, ids):
    return jnp.take(self.weight[...], ids, axis=0)

  def attend(self, x):
    """Tied output projection: x @ E^T."""
    w = self.weight[...]
    return jnp.einsum("...e,ve->...v", x, w, precision=precision_for(w.dtype))


ACT = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
