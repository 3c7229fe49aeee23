"""Training data as a pure function of (seed, step).

A `DataSource` returns the whole batch of optimizer step `step` (0-based: the batch consumed by
update `step + 1`) from nothing but its own seed and `step`. Resuming is then exact by
construction: the step number stored in a checkpoint IS the data position, and no iterator state
has to be saved. With gradient accumulation the trainer splits the step's batch of
`batch_size * grad_accum_steps` rows into `grad_accum_steps` consecutive micro-batches of
`batch_size` rows (micro-batch a = rows [a * batch_size, (a + 1) * batch_size)), so the
micro-batches are a deterministic function of the step as well, and 8 rows x 1 micro-batch sees
exactly the data of 4 rows x 2 micro-batches.

A batch is a dict of host arrays:
  tokens       [B, T] int32   token ids
  loss_mask    [B, T] float32 weight of each *target* position: position t is predicted from
                              the tokens before it, so loss_mask[:, 0] is never used (optional:
                              every target counts when absent)
  positions    [B, T] int32   RoPE positions, -1 for padding (optional: 0..T-1)
  segment_ids  [B, T] int32   packed documents; attention and targets stay within a segment (optional)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import numpy as np

from lcinfer.errors import ConfigError

BATCH_KEYS = ("tokens", "loss_mask", "positions", "segment_ids")
_DTYPES = {"tokens": np.int32, "loss_mask": np.float32, "positions": np.int32, "segment_ids": np.int32}


@runtime_checkable
class DataSource(Protocol):
  """Batches as a pure function of the step. Optionally `describe() -> dict` (JSON-able): it is
  stored in checkpoints, and a resumed run with a different description gets a warning."""

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The [global_batch, T] batch of optimizer step `step` (0-based)."""


def step_rng(seed: int, step: int) -> np.random.Generator:
  """A numpy Generator that depends only on (seed, step) (SeedSequence entropy [seed, step])."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))


def step_key(seed: int, step: int) -> jax.Array:
  """A JAX key that depends only on (seed, step): fold_in(key(seed), step)."""
  return jax.random.fold_in(jax.random.key(int(seed)), int(step))


@dataclasses.dataclass(frozen=True)
class SyntheticCopySource:
  """Random sequences whose second half repeats the first: x_0..x_{L-1} x_0..x_{L-1} (L = T // 2;
  an odd T gets one extra random token at the start).

  Tokens follow a Zipf law over [0, vocab_size) (p(v) ~ 1 / (v + 1)^zipf_exponent), so a model
  first learns the unigram distribution, then to copy (an induction head: Olsson et al. 2022).
  loss_mask counts the copied targets from the second one on (the first copied token is not
  predictable: nothing says where the repeat starts).
  """

  vocab_size: int
  batch_size: int  # rows per optimizer step: TrainConfig.global_batch_size
  seq_len: int
  seed: int = 0
  zipf_exponent: float = 1.0

  def __post_init__(self):
    for name, lo in (("vocab_size", 2), ("batch_size", 1), ("seq_len", 4)):
      v = getattr(self, name)
      if not isinstance(v, int) or v < lo:
        raise ConfigError(f"SyntheticCopySource field '{name}': must be an integer >= {lo}, got {v!r}")
    if self.zipf_exponent < 0:
      raise ConfigError(f"SyntheticCopySource field 'zipf_exponent': must be >= 0, got {self.zipf_exponent}")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    b, t = self.batch_size, self.seq_len
    half = t // 2
    lead = t - 2 * half
    p = 1.0 / np.arange(1, self.vocab_size + 1, dtype=np.float64) ** self.zipf_exponent
    rng = step_rng(self.seed, step)
    first = rng.choice(self.vocab_size, size=(b, lead + half), p=p / p.sum()).astype(np.int32)
    tokens = np.concatenate([first, first[:, lead:]], axis=1)
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[:, lead + half + 1:] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}

  def describe(self) -> dict[str, Any]:
    return {"source": "SyntheticCopySource", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CallableSource:
  """Wraps `fn(rng, step) -> batch`, where rng is a numpy Generator (rng="numpy") or a JAX key
  (rng="jax") that depends only on (seed, step). `fn` must itself be deterministic given them."""

  fn: Callable[[Any, int], dict]
  seed: int = 0
  rng: str = "numpy"
  name: str | None = None  # stored in checkpoints as the source's description

  def __post_init__(self):
    if not callable(self.fn):
      raise ConfigError(f"CallableSource field 'fn': must be callable, got {type(self.fn).__name__}")
    if self.rng not in ("numpy", "jax"):
      raise ConfigError(f"CallableSource field 'rng': use 'numpy' or 'jax', got {self.rng!r}")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = step_rng(self.seed, step) if self.rng == "numpy" else step_key(self.seed, step)
    return self.fn(rng, step)

  def describe(self) -> dict[str, Any]:
    name = self.name or getattr(self.fn, "__qualname__", type(self.fn).__name__)
    return {"source": "CallableSource", "fn": name, "seed": self.seed, "rng": self.rng}


def check_batch(batch: dict, *, global_batch: int, seq_len: int, vocab_size: int | None, step: int
                ) -> dict[str, np.ndarray]:
  """Validate a source's batch for step `step` and cast it: host arrays in the documented dtypes."""
  if not isinstance(batch, dict):
    raise ValueError(f"data source batch for step {step}: expected a dict, got {type(batch).__name__}")
  unknown = sorted(set(batch) - set(BATCH_KEYS))
  if unknown:
    raise ValueError(f"data source batch for step {step}: unknown key(s) {unknown}; "
                     f"known: {', '.join(BATCH_KEYS)}")
  if "tokens" not in batch:
    raise ValueError(f"data source batch for step {step}: 'tokens' is missing")
  out = {}
  for k, v in batch.items():
    a = np.asarray(jax.device_get(v))
    if a.shape != (global_batch, seq_len):
      raise ValueError(
          f"data source batch for step {step}: '{k}' has shape {a.shape}; the train config needs "
          f"(batch_size * grad_accum_steps, seq_len) = ({global_batch}, {seq_len})")
    if k != "loss_mask" and not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"data source batch for step {step}: '{k}' must be integers, got {a.dtype}")
    out[k] = a.astype(_DTYPES[k], copy=False)
  toks = out["tokens"]
  if vocab_size is not None and (toks.min() < 0 or toks.max() >= vocab_size):
    raise ValueError(f"data source batch for step {step}: token ids must be in [0, {vocab_size}), "
                     f"got {toks.min()}..{toks.max()}")
  return out


def split_micro_batches(batch: dict[str, np.ndarray], grad_accum_steps: int) -> dict[str, np.ndarray]:
  """[A * B, T] -> [A, B, T]: micro-batch a holds rows [a * B, (a + 1) * B)."""
  return {k: v.reshape(grad_accum_steps, v.shape[0] // grad_accum_steps, *v.shape[1:]) for k, v in batch.items()}
