"""Logical axis names -> mesh axes (ARCHITECTURE.md principle 6).

Parameters carry `logical_axes` metadata (e.g. ("vocab", "embed")); activations are constrained
with `constrain(x, axes)`. One table maps each logical name to mesh axes; a name whose mesh axes
are absent from the mesh (or of size 1) is replicated. A mesh is optional: with none, nothing
is sharded and `constrain` is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcinfer.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical name -> mesh axes (in order). Tensor parallelism splits heads and the MLP hidden size
# (Megatron style); FSDP splits the embedding dimension of weights; the KV cache splits heads.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", ()),
    ("cache_seq", ("context",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("qkv", ()),
    ("embed", ("fsdp",)),
    ("act_embed", ()),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("latent", ()),
    ("norm", ()),
)

_CTX: contextvars.ContextVar = contextvars.ContextVar("lcinfer_mesh", default=None)


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  """A mesh from {axis: size}, e.g. {"tensor": 8}. Axis names must be among MESH_AXES."""
  for a in shape:
    if a not in MESH_AXES:
      raise ConfigError(f"unknown mesh axis {a!r}; use {', '.join(MESH_AXES)}")
  devices = jax.devices() if devices is None else devices
  n = math.prod(shape.values())
  if n != len(devices):
    raise ConfigError(f"mesh {shape} needs {n} devices, {len(devices)} available")
  # Auto axes: XLA's sharding propagation (GSPMD) places what the logical annotations leave open.
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(tuple(shape.values()), tuple(shape.keys()), devices=devices, axis_types=auto)


def spec_for(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: Mesh,
             rules=DEFAULT_RULES, what: str = "array", strict: bool = True) -> PartitionSpec:
  """PartitionSpec for an array of `shape` with logical `axes`; checks divisibility first.

  strict=False (activations) replicates an axis whose size the mesh axes do not divide."""
  if axes is None:
    return PartitionSpec()
  if len(axes) != len(shape):
    raise ConfigError(f"{what}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ConfigError(f"{what}: logical axis {name!r} has no sharding rule; known: {', '.join(table)}")
    mesh_axes = tuple(a for a in table[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if dim % size and not strict:
      mesh_axes, size = (), 1
    if dim % size:
      raise ConfigError(
          f"{what}: axis {name!r} of size {dim} is not divisible by mesh axes {mesh_axes} of total size "
          f"{size}; choose a mesh whose {'x'.join(mesh_axes)} size divides {dim}")
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*out)


def named_sharding(shape, axes, mesh: Mesh, rules=DEFAULT_RULES, what="array") -> NamedSharding:
  return NamedSharding(mesh, spec_for(shape, axes, mesh, rules, what))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Within this context (also while tracing), `constrain` shards activations on `mesh`."""
  token = _CTX.set(None if mesh is None else (mesh, rules))
  try:
    yield
  finally:
    _CTX.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, when a mesh is active; identity otherwise."""
  ctx = _CTX.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules, strict=False)))
