"""One way to launch lcinfer's Triton-lowered Pallas kernels (and their poisoned-output test hook),
and the one lookup of the GPU the kernels would run on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def triton_call(kernel, args, *, grid, in_specs, out_specs, out_shape, num_warps, num_stages, interpret, name,
                poison=None):
  """pl.pallas_call with the Triton lowering (jax 0.11 defaults GPUs to Mosaic GPU otherwise).

  poison (testing hook): every output starts as a buffer filled with `poison` and aliased to it,
  passed to the kernel as extra trailing inputs (the kernel must be built with aliased=True), so
  an element the kernel never writes keeps the poison and fails the test.
  """
  args, in_specs, aliases = list(args), list(in_specs), {}
  if poison is not None:
    aliases = {len(args) + i: i for i in range(len(out_shape))}
    args += [jnp.full(s.shape, poison, s.dtype) for s in out_shape]
    in_specs += list(out_specs)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name)(*args)


def gpu_device():
  """The default device if it is a GPU, else None (no backend, or CPU / TPU)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  return dev if dev.platform == "gpu" else None


def hopper_device():
  """The default device if it is a Hopper GPU (sm_90: wgmma, TMA), else None."""
  dev = gpu_device()
  return dev if dev is not None and getattr(dev, "compute_capability", "") == "9.0" else None
