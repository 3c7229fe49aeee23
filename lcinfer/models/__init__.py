"""Model families, registered by HF `model_type`.

A family is one file defining an NNX model class and `config_from_hf` / `config_to_hf`, plus one
`register_family` call below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lcinfer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  model_cls: Any
  config_from_hf: Callable[[dict], Any]
  config_to_hf: Callable[[Any], dict]


_FAMILIES: dict[str, Family] = {}


def register_family(f: Family) -> Family:
  for mt in f.model_types:
    if mt in _FAMILIES:
      raise ValueError(f"model_type {mt!r} already registered")
    _FAMILIES[mt] = f
  return f


def supported_model_types() -> list[str]:
  return sorted(_FAMILIES)


def get_family(model_type: str) -> Family:
  if model_type not in _FAMILIES:
    raise ConfigError(f"config field 'model_type': unsupported value {model_type!r}; "
                      f"supported: {', '.join(supported_model_types())}")
  return _FAMILIES[model_type]


def _register_builtin():
  from lcinfer.models import llama

  register_family(Family("llama", ("llama", "mistral", "qwen2", "phi3"), llama.Llama, llama.config_from_hf,
                         llama.config_to_hf))


_register_builtin()


def build_model(config, *, dtype, rngs):
  """A randomly initialised model of `config`'s family."""
  return get_family(config.model_type).model_cls(config, dtype=dtype, rngs=rngs)
