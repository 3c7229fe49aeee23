"""`TrainConfig`: everything that decides a training run, frozen and checked on construction.

Batch sizes: `batch_size` rows per micro-batch, `grad_accum_steps` micro-batches per optimizer
update, so one step consumes `global_batch_size = batch_size * grad_accum_steps` sequences of
`seq_len` tokens. Every check raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lcinfer.errors import ConfigError

SCHEDULES = ("cosine", "constant", "linear")
PARAM_DTYPES = ("float32", "bfloat16")

# Fields that must equal the checkpoint's to resume: they fix the model's parameters, the data
# consumed per step and the random streams. The optimizer fields may change (with a warning: the
# run then no longer matches an uninterrupted one); the bookkeeping fields may change freely.
RESUME_MUST_MATCH = ("batch_size", "grad_accum_steps", "seq_len", "seed", "dtype")
RESUME_MAY_CHANGE = ("learning_rate", "warmup_steps", "total_steps", "schedule", "min_lr_ratio", "weight_decay",
                     "b1", "b2", "grad_clip_norm")


def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"train config field '{field}': {msg}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run: AdamW (Loshchilov & Hutter 2019) with global-norm clipping (Pascanu et al.
  2013), linear warmup then a cosine (Loshchilov & Hutter 2017), linear or constant schedule.

  learning_rate: peak learning rate, reached after `warmup_steps` (linear from 0).
  schedule: after warmup, "cosine" / "linear" decay to `learning_rate * min_lr_ratio` at
    `total_steps`, or "constant".
  weight_decay: decoupled decay on matrices only (norm scales and biases, the 1-D parameters, skip it).
  grad_clip_norm: clip the global gradient norm to this; 0 turns clipping off.
  dtype: parameter (and activation) dtype; the loss is computed in float32 either way. With
    "bfloat16" the optimizer state is bfloat16 too (no float32 master copy).
  save_every: checkpoint every this many steps (and at the last step) when `checkpoint_dir` is set.
  keep_checkpoints: how many checkpoints to keep (the newest); None keeps all.
  log_every: print and record metrics (means over the steps since the last record) this often.
  metrics_path: JSON-lines file the records are appended to (None: stdout only).
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 0
  total_steps: int = 1000
  schedule: str = "cosine"
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  grad_clip_norm: float = 1.0
  batch_size: int = 8
  grad_accum_steps: int = 1
  seq_len: int = 2048
  seed: int = 0
  save_every: int = 1000
  keep_checkpoints: int | None = 3
  log_every: int = 10
  dtype: str = "float32"
  checkpoint_dir: str | Path | None = None
  metrics_path: str | Path | None = None

  def __post_init__(self):
    _require(_is_num(self.learning_rate) and self.learning_rate > 0, "learning_rate",
             f"must be a number > 0, got {self.learning_rate!r}")
    for name, lo in (("total_steps", 1), ("warmup_steps", 0), ("batch_size", 1), ("grad_accum_steps", 1),
                     ("seq_len", 2), ("save_every", 1), ("log_every", 1)):
      v = getattr(self, name)
      _require(_is_int(v) and v >= lo, name, f"must be an integer >= {lo}, got {v!r}")
    _require(self.warmup_steps <= self.total_steps, "warmup_steps",
             f"({self.warmup_steps}) must not exceed total_steps ({self.total_steps})")
    _require(self.schedule in SCHEDULES, "schedule",
             f"unsupported value {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
    _require(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
             f"must be in [0, 1], got {self.min_lr_ratio!r}")
    _require(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             f"must be >= 0, got {self.weight_decay!r}")
    for name in ("b1", "b2"):
      v = getattr(self, name)
      _require(_is_num(v) and 0 <= v < 1, name, f"must be in [0, 1), got {v!r}")
    _require(_is_num(self.grad_clip_norm) and self.grad_clip_norm >= 0, "grad_clip_norm",
             f"must be >= 0 (0 disables clipping), got {self.grad_clip_norm!r}")
    _require(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
    _require(self.keep_checkpoints is None or (_is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1),
             "keep_checkpoints", f"must be an integer >= 1 or None (keep all), got {self.keep_checkpoints!r}")
    _require(self.dtype in PARAM_DTYPES, "dtype",
             f"unsupported value {self.dtype!r}; use one of {', '.join(PARAM_DTYPES)}")
    for name in ("checkpoint_dir", "metrics_path"):
      v = getattr(self, name)
      _require(v is None or (isinstance(v, str | Path) and str(v) != ""), name,
               f"must be a path (str or Path) or None, got {v!r}")

  @property
  def global_batch_size(self) -> int:
    """Sequences per optimizer step: batch_size * grad_accum_steps."""
    return self.batch_size * self.grad_accum_steps

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch_size * self.seq_len

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for k in ("checkpoint_dir", "metrics_path"):
      d[k] = None if d[k] is None else str(d[k])
    return d

  @staticmethod
  def from_dict(d: dict[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"train config field '{unknown[0]}': unknown; known fields: {', '.join(sorted(names))}")
    return TrainConfig(**d)

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)
