"""`train(config, model, data)`: the training loop, checkpointed and resumable bit-exactly.

    from lcinfer.train import TrainConfig, SyntheticCopySource, train
    cfg = TrainConfig(learning_rate=1e-3, total_steps=1000, batch_size=8, seq_len=2048,
                      checkpoint_dir="runs/a/ckpt", metrics_path="runs/a/metrics.jsonl")
    result = train(cfg, model, SyntheticCopySource(vocab, cfg.global_batch_size, cfg.seq_len), mesh=mesh)
    result.params, result.history

Resume: if `checkpoint_dir` holds a checkpoint, the newest one is restored (arrays placed directly
on the mesh's shardings) and training continues from its step. The state saved is everything the
next update depends on: trainable parameters, optimizer state (its step count drives the schedule)
and the rng; the data position is the step itself, since a DataSource's batch is a pure function
of (seed, step). So a run killed and resumed computes, bit for bit, what an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lcinfer.errors import CheckpointError, ConfigError
from lcinfer.train import step as S
from lcinfer.train.checkpoint import TrainCheckpoints
from lcinfer.train.config import RESUME_MAY_CHANGE, RESUME_MUST_MATCH, TrainConfig
from lcinfer.train.data import DataSource, check_batch, split_micro_batches
from lcinfer.train.loss import next_token_loss
from lcinfer.train.metrics import MetricsLog, format_record, window_record
from lcinfer.train.optim import make_optimizer

_PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class TrainResult:
  graphdef: Any
  params: nnx.State  # all parameters (trainable and frozen), as nnx.split returns them
  history: list[dict]  # the metric records of this call (see metrics.py)
  start_step: int  # the step this call started from: 0, or the restored checkpoint's
  step: int  # the step reached

  @property
  def model(self):
    return nnx.merge(self.graphdef, self.params)


def _split_model(model) -> tuple[Any, nnx.State]:
  if isinstance(model, nnx.Module):
    return nnx.split(model)
  if isinstance(model, tuple) and len(model) == 2:
    return model
  if hasattr(model, "graphdef") and hasattr(model, "params"):  # lcinfer.LLM
    return model.graphdef, model.params
  raise TypeError(f"model must be an nnx.Module, a (graphdef, params) pair or an lcinfer.LLM, "
                  f"got {type(model).__name__}")


def _cast(params: nnx.State, dtype) -> nnx.State:
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def _host(named: dict) -> dict:
  return {n: (v.get_value() if isinstance(v, nnx.Variable) else v) for n, v in named.items()}


class Trainer:
  """The state of one training run. `Trainer(...)` restores the latest checkpoint (if any);
  `run()` trains to `config.total_steps`.

  model: an nnx.Module, (graphdef, params) or lcinfer.LLM; its arrays are copied, never donated.
  data: a DataSource (`batch(step)` -> [batch_size * grad_accum_steps, seq_len] arrays).
  mesh: parameters and optimizer state are placed by their logical axes, batches along
    ("batch", "seq"); the step runs under `lcinfer.sharding.use_mesh(mesh)`.
  loss_fn: `loss_fn(model, batch, rng) -> (loss_sum, sums)` (see loss.py); must be hashable
    (a module-level function or a functools.partial made once): it keys the compilation cache.
  trainable: `trainable(name, variable) -> bool` selects the parameters to train (default: all);
    the others get no gradient, no optimizer state, and are not saved in checkpoints (pass the
    same base model when resuming).
  progress: show a tqdm progress bar; log: where metric lines go (None: nowhere).
  """

  def __init__(self, config: TrainConfig, model, data: DataSource, *, mesh=None, loss_fn=next_token_loss,
               trainable: Callable[[str, nnx.Variable], bool] | None = None, progress: bool = True,
               log: Callable[[str], None] | None = print):
    if not isinstance(config, TrainConfig):
      raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(getattr(data, "batch", None)):
      raise TypeError(f"data must be a DataSource with a batch(step) method, got {type(data).__name__}")
    self.config, self.data, self.mesh, self.loss_fn = config, data, mesh, loss_fn
    self.progress, self.log = progress, log
    self.graphdef, params = _split_model(model)
    self.model_config = getattr(nnx.merge(self.graphdef, params), "config", None)
    self.vocab_size = getattr(self.model_config, "vocab_size", None)
    params = _cast(params, _PARAM_DTYPES[config.dtype])
    self.frozen = S.frozen_names(params, trainable)
    train_params, frozen_params = S.split_trainable(params, self.frozen)
    self.train_params = S.place(train_params, mesh, copy=True)  # donated by every step
    self.frozen_params = S.place(frozen_params, mesh, copy=False)
    self._step_config = S.step_config(config)
    self.step = 0
    self.elapsed_before = 0.0
    self.rng = None
    self.opt_state = None
    self.checkpoints = None
    if config.checkpoint_dir is not None:
      self.checkpoints = TrainCheckpoints(config.checkpoint_dir, keep=config.keep_checkpoints)
      latest = self.checkpoints.latest_step()
      if latest is not None:
        self._restore(latest)
    if self.opt_state is None:
      self.opt_state = S.init_opt_state(self.train_params, self._step_config, mesh)
      self.rng = self._place_rng(jax.random.key_data(jax.random.key(config.seed)))
    self.start_step = self.step
    self._saved_step = self.step if self.checkpoints is not None and self.step > 0 else None
    self.metrics = MetricsLog(config.metrics_path, self.step)

  # -- state ----------------------------------------------------------------------------------------
  def _place_rng(self, rng):
    return jax.device_put(jnp.asarray(rng, jnp.uint32), S.leaf_sharding("rng", rng, self.mesh))

  @property
  def params(self) -> nnx.State:
    """All parameters (trainable and frozen) as one nnx.State."""
    return S.join_params(self.train_params, self.frozen_params)

  def _meta(self) -> dict:
    describe = getattr(self.data, "describe", None)
    return {"step": self.step, "train_config": self.config.to_dict(),
            "model_config": None if self.model_config is None else self.model_config.to_dict(),
            "data": describe() if callable(describe) else None, "frozen": sorted(self.frozen),
            "elapsed_s": self._elapsed()}

  def _elapsed(self) -> float:
    t0 = getattr(self, "_t0", None)
    return self.elapsed_before + (0.0 if t0 is None else time.perf_counter() - t0)

  def save(self) -> None:
    """Checkpoint the current step (asynchronously; `wait()` blocks until it is on disk)."""
    if self.checkpoints is None:
      raise ConfigError("train config field 'checkpoint_dir': not set, so there is nowhere to save")
    if self._saved_step == self.step:
      return
    p, _ = S.flatten_named(self.train_params)
    o, _ = S.flatten_named(self.opt_state)
    state = {"params": _host(p), "opt_state": _host(o), "rng": self.rng}
    self.checkpoints.save(self.step, state, self._meta())
    self._saved_step = self.step

  def wait(self) -> None:
    if self.checkpoints is not None:
      self.checkpoints.wait()

  def _check_compatible(self, meta: dict, where) -> None:
    saved = meta.get("train_config") or {}
    now = self.config.to_dict()
    for f in RESUME_MUST_MATCH:
      if saved.get(f) != now[f]:
        raise ConfigError(
            f"train config field '{f}': the checkpoint {where} was trained with {f}={saved.get(f)!r}, this "
            f"run has {f}={now[f]!r}; they must match to continue the run (or use a new checkpoint_dir)")
    changed = [f"{f} {saved.get(f)!r} -> {now[f]!r}" for f in RESUME_MAY_CHANGE if saved.get(f) != now[f]]
    if changed:
      warnings.warn(f"resuming {where} with a changed optimizer config ({'; '.join(changed)}): the run will "
                    f"not match an uninterrupted one", stacklevel=3)
    mc = meta.get("model_config")
    now_mc = None if self.model_config is None else json.loads(json.dumps(self.model_config.to_dict()))
    if mc is not None and now_mc is not None and mc != now_mc:
      diff = [f"{k}: checkpoint {mc.get(k)!r}, model {now_mc.get(k)!r}"
              for k in sorted(set(mc) | set(now_mc)) if mc.get(k) != now_mc.get(k)]
      raise ConfigError(f"the checkpoint {where} is of a different model ({'; '.join(diff)}); pass the model it "
                        f"was trained from, or use a new checkpoint_dir")
    if sorted(meta.get("frozen", [])) != sorted(self.frozen):
      raise ConfigError(f"the checkpoint {where} trained a different set of parameters (trainable filter "
                        f"differs: {len(meta.get('frozen', []))} frozen then, {len(self.frozen)} now)")
    describe = getattr(self.data, "describe", None)
    if callable(describe) and meta.get("data") is not None and meta["data"] != describe():
      warnings.warn(f"resuming {where} with a different data source ({meta['data']} -> {describe()}): the data "
                    f"position (the step) carries over, the data does not", stacklevel=3)

  def _restore(self, step: int) -> None:
    where = self.checkpoints.directory / str(step)
    meta = self.checkpoints.read_meta(step)
    self._check_compatible(meta, where)
    p_named, p_def = S.flatten_named(self.train_params)
    abstract_opt = jax.eval_shape(make_optimizer(self._step_config).init, self.train_params)
    o_named, o_def = S.flatten_named(abstract_opt)

    def sds(name, leaf):
      return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=S.leaf_sharding(name, leaf, self.mesh))

    rng_host = np.zeros((2,), np.uint32)
    target = {"params": {n: sds(n, v) for n, v in p_named.items()},
              "opt_state": {n: sds(n, v) for n, v in o_named.items()},
              "rng": sds("rng", rng_host)}
    expected = {f"{g}.{n}": (tuple(v.shape), str(v.dtype)) for g in ("params", "opt_state")
                for n, v in target[g].items()}
    expected["rng"] = ((2,), "uint32")
    stored = self.checkpoints.stored_arrays(step)
    problems = [f"{n} is missing (expected shape {expected[n][0]})" for n in sorted(set(expected) - set(stored))]
    problems += [f"{n} is not in this model (shape {stored[n][0]})" for n in sorted(set(stored) - set(expected))]
    problems += [f"{n} has shape {stored[n][0]} {stored[n][1]} in the checkpoint, {expected[n][0]} {expected[n][1]} "
                 f"in this run" for n in sorted(set(stored) & set(expected)) if stored[n] != expected[n]]
    if problems:
      raise CheckpointError(f"the checkpoint {where} does not fit this model and optimizer ({len(problems)} "
                            f"problem(s)):\n  " + "\n  ".join(problems))
    state = self.checkpoints.restore(step, target)
    self.train_params = S.unflatten_named(p_def, p_named, state["params"])
    self.opt_state = S.unflatten_named(o_def, o_named, state["opt_state"])
    self.rng = state["rng"]
    self.step = int(meta["step"])
    self.elapsed_before = float(meta.get("elapsed_s", 0.0))

  # -- the loop -------------------------------------------------------------------------------------
  def _micro_batches(self, step: int) -> dict:
    c = self.config
    batch = check_batch(self.data.batch(step), global_batch=c.global_batch_size, seq_len=c.seq_len,
                        vocab_size=self.vocab_size, step=step)
    return S.place_batch(split_micro_batches(batch, c.grad_accum_steps), self.mesh)

  def _emit(self, line: str, bar) -> None:
    if self.log is None:
      return
    if bar is not None and not bar.disable and self.log is print:
      bar.write(line)
    else:
      self.log(line)

  def run(self, on_step: Callable[["Trainer", int], bool | None] | None = None) -> TrainResult:
    """Train to `config.total_steps`; returns the final parameters and this call's metric records.

    on_step(trainer, step) runs after each update (and its save/log); returning True stops early.
    Every asynchronous save is finished before this returns.
    """
    c = self.config
    history: list[dict] = []
    window: list[dict] = []
    self._t0 = time.perf_counter()
    t_window = self._t0
    bar = tqdm(total=c.total_steps, initial=self.step, unit="step", desc="train", disable=not self.progress,
               dynamic_ncols=True)
    try:
      while self.step < c.total_steps:
        s = self.step
        batch = self._micro_batches(s)
        self.train_params, self.opt_state, metrics = S.train_step(
            self.graphdef, self.train_params, self.frozen_params, self.opt_state, self.rng, jnp.int32(s), batch,
            config=self._step_config, loss_fn=self.loss_fn, mesh=self.mesh)
        self.step = s + 1
        window.append(metrics)
        if self.step % c.log_every == 0 or self.step == c.total_steps:
          host = jax.device_get(window)
          now = time.perf_counter()
          rec = window_record(self.step, host, seconds=now - t_window, tokens=len(host) * c.tokens_per_step,
                              elapsed_s=self._elapsed())
          t_window, window = now, []
          history.append(rec)
          self.metrics.write(rec)
          self._emit(format_record(rec, c.total_steps), bar)
          bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}", refresh=False)
        if self.checkpoints is not None and (self.step % c.save_every == 0 or self.step == c.total_steps):
          self.save()
        bar.update(1)
        if on_step is not None and on_step(self, self.step):
          break
      if self.checkpoints is not None and self.step > 0:
        self.save()  # no-op when this step is saved already
    finally:
      bar.close()
      self.wait()
    return TrainResult(graphdef=self.graphdef, params=self.params, history=history, start_step=self.start_step,
                       step=self.step)

  def close(self) -> None:
    """Finish pending saves and release the checkpoint manager."""
    if self.checkpoints is not None:
      self.checkpoints.close()


def train(config: TrainConfig, model, data: DataSource, *, mesh=None, loss_fn=next_token_loss,
          trainable: Callable[[str, nnx.Variable], bool] | None = None,
          on_step: Callable[[Trainer, int], bool | None] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = print) -> TrainResult:
  """Train `model` on `data` to `config.total_steps`, resuming from the newest checkpoint in
  `config.checkpoint_dir` if there is one. See `Trainer` for the arguments."""
  trainer = Trainer(config, model, data, mesh=mesh, loss_fn=loss_fn, trainable=trainable, progress=progress, log=log)
  try:
    return trainer.run(on_step=on_step)
  finally:
    trainer.close()
