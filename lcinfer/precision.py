"""Matmul precision by dtype, shared by models and attention methods."""

import jax
import jax.numpy as jnp


def precision_for(dtype):
  """float32 means float32: HIGHEST keeps XLA on GPU from running f32 dots in TF32 (HF/torch do not
  use TF32 by default either). bf16/fp16 operands keep the default (tensor cores, f32 accumulation)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
