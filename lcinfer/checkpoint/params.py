"""Model parameters <-> flat HF tensor names, checked before anything is loaded, placed on a mesh.

The NNX module tree mirrors HF names, so the name of a parameter is its path joined by dots
("model.layers.0.self_attn.q_proj.weight"). Every problem (missing, unexpected, wrong shape) is
collected and reported together.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lcinfer.checkpoint import safetensors_io as st
from lcinfer.config import ModelConfig
from lcinfer.errors import CheckpointError, ConfigError
from lcinfer.models import build_model
from lcinfer.sharding import named_sharding

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def parse_dtype(dtype) -> np.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return np.dtype(DTYPES[dtype])
  return np.dtype(dtype)


def dtype_name(dtype) -> str:
  return {np.dtype(v): k for k, v in DTYPES.items()}[np.dtype(dtype)]


def abstract_model(config: ModelConfig, dtype):
  """(graphdef, abstract state) without allocating any parameter."""
  model = nnx.eval_shape(lambda: build_model(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
  return nnx.split(model)


def flat_variables(state) -> dict[str, tuple[tuple, nnx.Variable]]:
  return {".".join(str(p) for p in path): (path, var) for path, var in nnx.to_flat_state(state)}


def sharding_of(var: nnx.Variable, mesh, name: str):
  if mesh is None:
    return None
  axes = var.get_metadata().get("logical_axes")
  return named_sharding(var.shape, axes, mesh, what=f"parameter {name}")


def _ignorable(name: str, config: ModelConfig) -> bool:
  # Non-persistent RoPE buffers some old exports contain; lm_head of a tied model (HF ignores it too).
  return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def check_tensors(index: dict[str, tuple], expected: dict[str, tuple[int, ...]], config: ModelConfig) -> list[str]:
  problems = []
  for name in sorted(set(expected) - set(index)):
    problems.append(f"missing tensor {name} (expected shape {expected[name]})")
  for name in sorted(set(index) - set(expected)):
    if not _ignorable(name, config):
      problems.append(f"unexpected tensor {name} (shape {index[name][1]}) in {index[name][0].name}")
  for name in sorted(set(index) & set(expected)):
    if tuple(index[name][1]) != tuple(expected[name]):
      problems.append(f"tensor {name} has shape {tuple(index[name][1])}, the config implies {expected[name]}")
    elif index[name][2] not in _SAFETENSORS_DTYPES:
      problems.append(f"tensor {name} has dtype {index[name][2]}; supported: F32, BF16, F16")
  return problems


def read_hf_arrays(hf_dir: str | Path, config: ModelConfig) -> dict[str, np.ndarray]:
  """All parameters of an HF directory as host arrays in their stored dtype, after full validation."""
  files = st.find_safetensors(hf_dir)
  index = st.tensor_index(files)
  _, abs_state = abstract_model(config, np.float32)
  expected = {n: tuple(v.shape) for n, (_, v) in flat_variables(abs_state).items()}
  problems = check_tensors(index, expected, config)
  if problems:
    raise CheckpointError(f"{hf_dir} does not match its config.json ({len(problems)} problem(s)):\n  "
                          + "\n  ".join(problems))
  return {n: a for n, a in st.iter_tensors(files) if n in expected}


def build_state(config: ModelConfig, arrays: dict[str, np.ndarray], dtype, mesh=None):
  """(graphdef, state) with each array cast to `dtype` and placed (sharded when a mesh is given)."""
  graphdef, abs_state = abstract_model(config, dtype)
  flat = flat_variables(abs_state)
  missing = sorted(set(flat) - set(arrays))
  if missing:
    raise CheckpointError(f"missing tensor(s): {', '.join(missing)}")
  np_dtype = parse_dtype(dtype)
  leaves = []
  for name, (path, var) in flat.items():
    a = arrays[name]
    sh = sharding_of(var, mesh, name)
    if isinstance(a, jax.Array):  # already on device (orbax restore placed it): cast there
      a = a if a.dtype == np_dtype else a.astype(np_dtype)
      value = a if sh is None else jax.device_put(a, sh)
    else:
      a = np.asarray(a)
      a = a if a.dtype == np_dtype else a.astype(np_dtype)
      value = jax.device_put(a, sh) if sh is not None else jnp.asarray(a)
    leaves.append((path, var.replace(value=value)))
  return graphdef, nnx.from_flat_state(leaves)


def state_to_arrays(state) -> dict[str, np.ndarray]:
  """Flat {HF name: host array} of a model state (gathers sharded arrays)."""
  return {n: np.asarray(jax.device_get(v.get_value())) for n, (_, v) in flat_variables(state).items()}


def abstract_arrays(config: ModelConfig, dtype, mesh=None) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {name: ShapeDtypeStruct} with target shardings, for orbax restore."""
  _, abs_state = abstract_model(config, dtype)
  out = {}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for name, (_, var) in flat_variables(abs_state).items():
    sh = sharding_of(var, mesh, name) or dev
    out[name] = jax.ShapeDtypeStruct(tuple(var.shape), jnp.dtype(dtype), sharding=sh)
  return out
