"""Frozen model configs, built from a Hugging Face `config.json`.

`ModelConfig.from_hf(d)` dispatches on `model_type` through the model registry
(`lcinfer.models`), so adding a family is one file plus a registry entry. Every check lives in
`__post_init__` and raises `ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lcinfer.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config field '{field}': {msg}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding and its context-extension scaling, as transformers defines them.

  rope_type: default | linear (PI) | dynamic (NTK-aware, recomputed from the longest position of
  each call, as HF does) | llama3 | yarn | longrope (Phi-3 "su": short/long factors switched on
  the longest position of each call, as HF does).
  """

  rope_type: str = "default"
  theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  factor: float | None = None
  original_max_position_embeddings: int | None = None
  # llama3
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  # yarn
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True
  # yarn and longrope
  attention_factor: float | None = None
  # longrope
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None

  def __post_init__(self):
    f = "rope_scaling.rope_type"
    _require(self.rope_type in ROPE_TYPES, f,
             f"unsupported value {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    _require(self.theta > 0, "rope_theta", f"must be > 0, got {self.theta}")
    _require(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor",
             f"must be in (0, 1], got {self.partial_rotary_factor}")
    needs_factor = {"linear", "dynamic", "llama3", "yarn"}
    if self.rope_type in needs_factor:
      _require(self.factor is not None and self.factor > 0, "rope_scaling.factor",
               f"rope_type {self.rope_type!r} needs a positive 'factor', got {self.factor}")
    if self.rope_type == "llama3":
      for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        _require(getattr(self, name) is not None, f"rope_scaling.{name}", "required by rope_type 'llama3'")
      _require(self.high_freq_factor != self.low_freq_factor, "rope_scaling.high_freq_factor",
               "must differ from low_freq_factor")
    if self.rope_type in ("yarn", "longrope"):
      _require(self.original_max_position_embeddings is not None,
               "rope_scaling.original_max_position_embeddings", f"required by rope_type {self.rope_type!r}")
    if self.rope_type == "longrope":
      _require(self.short_factor is not None and self.long_factor is not None,
               "rope_scaling.short_factor", "rope_type 'longrope' needs short_factor and long_factor lists")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer, in HF's vocabulary. Shapes are static; nothing here is traced."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  fused_qkv: bool = False  # Phi-3: one qkv_proj [(H + 2K) * D, E]
  fused_gate_up: bool = False  # Phi-3: one gate_up_proj [2 * F, E]
  # Per-layer sliding window in tokens (None = full attention). A query at position p sees keys at
  # positions p - window < k <= p, as transformers' sliding-window mask does.
  layer_windows: tuple[int | None, ...] = ()
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str | None = None  # the checkpoint's own dtype (HF `torch_dtype` / `dtype`), if it says

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
    _require(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads",
             f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_kv_heads})")
    _require(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
    _require(self.hidden_act in ACTIVATIONS, "hidden_act",
             f"unsupported value {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
    _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
    if not self.layer_windows:
      object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
    _require(len(self.layer_windows) == self.num_layers, "layer_types",
             f"has {len(self.layer_windows)} entries for {self.num_layers} layers")
    for w in self.layer_windows:
      _require(w is None or (isinstance(w, int) and w > 0), "sliding_window", f"must be a positive int, got {w!r}")
    if self.rope.rope_type == "longrope":
      half = self.rotary_dim // 2
      for name in ("short_factor", "long_factor"):
        n = len(getattr(self.rope, name))
        _require(n == half, f"rope_scaling.{name}", f"has {n} entries; rotary_dim/2 = {half} needed")

  # -- derived shapes --------------------------------------------------------------------------
  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rope.partial_rotary_factor)

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def sliding_window(self) -> int | None:
    """The window if every layer shares one, else None (see layer_windows)."""
    ws = set(self.layer_windows)
    return ws.pop() if len(ws) == 1 else None

  def num_params(self) -> int:
    e, f, h, k, d, v = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                        self.head_dim, self.vocab_size)
    attn = e * (h + 2 * k) * d + h * d * e
    mlp = 3 * e * f
    per_layer = attn + mlp + 2 * e
    return v * e * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + e

  def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem

  # -- construction ----------------------------------------------------------------------------
  @staticmethod
  def from_hf(d: dict[str, Any] | str | Path) -> "ModelConfig":
    """Build from an HF config dict, a config.json path, or a checkpoint directory."""
    if not isinstance(d, dict):
      p = Path(d)
      if p.is_dir():
        p = p / "config.json"
      if not p.exists():
        raise ConfigError(f"no config.json at {p}")
      try:
        d = json.loads(p.read_text())
      except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from None
    from lcinfer.models import get_family  # registry; imported here to avoid a cycle

    if "model_type" not in d:
      raise ConfigError("config field 'model_type': missing")
    return get_family(d["model_type"]).config_from_hf(d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @staticmethod
  def from_dict(d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    rope = dict(d.pop("rope", {}))
    for k in ("short_factor", "long_factor"):
      if rope.get(k) is not None:
        rope[k] = tuple(rope[k])
    d["layer_windows"] = tuple(d.get("layer_windows", ()))
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return ModelConfig(rope=RopeConfig(**rope), **d)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def rope_from_hf(d: dict[str, Any]) -> RopeConfig:
  """RoPE fields from either HF format: v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
  params = d.get("rope_parameters") or {}
  scaling = d.get("rope_scaling") or {}
  if not isinstance(params, dict) or not isinstance(scaling, dict):
    raise ConfigError("config field 'rope_parameters'/'rope_scaling': must be a JSON object")
  if params and any(isinstance(v, dict) for v in params.values()):
    raise ConfigError("config field 'rope_parameters': per-layer-type RoPE parameters are not supported")
  merged = {**scaling, **params}
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  if rope_type == "su":  # early Phi-3 name of longrope
    rope_type = "longrope"
  theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
  prf = merged.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
  orig = merged.get("original_max_position_embeddings")
  if rope_type in ("llama3", "yarn", "longrope"):
    # transformers: a top-level original_max_position_embeddings (Phi-3) wins, else max_position_embeddings.
    orig = d.get("original_max_position_embeddings", orig) or d.get("max_position_embeddings")
  factor = merged.get("factor")
  if rope_type in ("yarn", "longrope") and factor is None and orig:
    factor = d["max_position_embeddings"] / orig

  def tup(x):
    return None if x is None else tuple(float(v) for v in x)

  kw = dict(
      rope_type=rope_type, theta=float(theta), partial_rotary_factor=float(prf),
      factor=None if factor is None else float(factor),
      original_max_position_embeddings=None if orig is None else int(orig),
      low_freq_factor=merged.get("low_freq_factor"), high_freq_factor=merged.get("high_freq_factor"),
      beta_fast=merged.get("beta_fast"), beta_slow=merged.get("beta_slow"),
      mscale=merged.get("mscale"), mscale_all_dim=merged.get("mscale_all_dim"),
      truncate=bool(merged.get("truncate", True)), attention_factor=merged.get("attention_factor"),
      short_factor=tup(merged.get("short_factor")), long_factor=tup(merged.get("long_factor")),
  )
  return RopeConfig(**kw)


def eos_ids(v: Any) -> tuple[int, ...]:
  if v is None:
    return ()
  if isinstance(v, int):
    return (v,)
  return tuple(int(x) for x in v)

