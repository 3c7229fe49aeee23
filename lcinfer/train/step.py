"""The jitted train step and the placement of training state by logical axis names.

One call = one optimizer update: the step's micro-batches [A, B, T] go through `jax.lax.scan`,
whose body takes the gradient of one micro-batch's loss sum and adds it (in float32) to a running
sum; the sum is divided by the total target weight (loss.py), clipped and applied by AdamW. The
result equals a single batch of A * B rows up to float32 summation order. Trainable parameters and
the optimizer state are donated, so XLA updates them in place.

Parameters may be split into trainable and frozen ones (names, static): the gradient is taken
with respect to the trainable ones only, and only they have optimizer state, which is what
partial fine-tuning (SwiftKV, DuoAttention gates) needs.

Placement: every `nnx.Variable` (parameters, Adam moments) goes where its `logical_axes` say
(lcinfer.sharding rules); other leaves (counters, the rng) are replicated; batches are sharded
along ("batch", "seq") with the micro-batch axis replicated.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lcinfer.sharding import constrain, named_sharding, use_mesh
from lcinfer.train.config import TrainConfig
from lcinfer.train.loss import mean_metrics
from lcinfer.train.optim import make_optimizer, make_schedule

# How many times the train step was traced (= compiled per new shape / config). Tests read this.
TRACES: collections.Counter = collections.Counter()

BATCH_AXES = (None, "batch", "seq")  # micro-batches [A, B, T]


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_name(path) -> str:
  """The dotted name of an nnx state path or a jax key path: "model.layers.0.self_attn.q_proj.weight"."""
  return ".".join(_key_name(k) for k in path)


def flatten_named(tree) -> tuple[dict[str, object], jax.tree_util.PyTreeDef]:
  """({dotted name: leaf}, treedef) with `nnx.Variable`s kept as leaves (they carry logical axes)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
  named = {}
  for path, leaf in leaves:
    name = path_name(path)
    if name in named:
      raise ValueError(f"two leaves of the training state are both named {name!r}")
    named[name] = leaf
  return named, treedef


def unflatten_named(treedef, template: dict[str, object], values: dict[str, object]):
  """Inverse of flatten_named: `template` gives the leaves (Variables keep their metadata)."""
  leaves = [t.replace(value=values[n]) if _is_var(t) else values[n] for n, t in template.items()]
  return treedef.unflatten(leaves)


# -- placement ------------------------------------------------------------------------------------
def leaf_sharding(name: str, leaf, mesh):
  """Where one leaf of the training state lives: by logical axes for Variables, else replicated."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if _is_var(leaf):
    axes = leaf.get_metadata().get("logical_axes")
    return named_sharding(leaf.shape, axes, mesh, what=f"training state {name}")
  return NamedSharding(mesh, PartitionSpec())


def shardings_of(tree, mesh):
  """A tree of shardings with the structure of `tree` (Variables wrap their sharding)."""
  named, treedef = flatten_named(tree)
  return unflatten_named(treedef, named, {n: leaf_sharding(n, v, mesh) for n, v in named.items()})


def place(tree, mesh, *, copy: bool):
  """`tree` with every array on its sharding. copy=True for what will be donated, so the caller's
  arrays are never consumed; frozen parameters are only moved (no copy when already in place)."""
  named, treedef = flatten_named(tree)
  out = {}
  for n, leaf in named.items():
    a = leaf.get_value() if _is_var(leaf) else leaf
    out[n] = jax.device_put(a, leaf_sharding(n, leaf, mesh), may_alias=False if copy else None)
  return unflatten_named(treedef, named, out)


def batch_sharding(shape, mesh, key: str = "tokens"):
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return named_sharding(shape, BATCH_AXES[-len(shape):], mesh, what=f"batch '{key}' {tuple(shape)}")


def place_batch(micro_batches: dict, mesh) -> dict:
  return {k: jax.device_put(v, batch_sharding(v.shape, mesh, k)) for k, v in micro_batches.items()}


def _constrain_vars(tree):
  """Pin Variables to their logical sharding inside a trace (identity without a mesh)."""
  def one(leaf):
    axes = leaf.get_metadata().get("logical_axes")
    return leaf if axes is None else leaf.replace(value=constrain(leaf.get_value(), axes))
  return jax.tree.map(lambda x: one(x) if _is_var(x) else x, tree, is_leaf=_is_var)


# -- trainable / frozen -----------------------------------------------------------------------------
def frozen_names(params, trainable: Callable[[str, nnx.Variable], bool] | None) -> frozenset[str]:
  """Names of the parameters `trainable(name, variable)` rejects (none when trainable is None)."""
  if trainable is None:
    return frozenset()
  named, _ = flatten_named(params)
  out = frozenset(n for n, v in named.items() if not trainable(n, v))
  if len(out) == len(named):
    raise ValueError("the trainable filter rejects every parameter: nothing to train")
  return out


def split_trainable(params: nnx.State, frozen: frozenset[str]) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) sub-states by parameter name."""
  return nnx.split_state(params, lambda path, _: path_name(path) not in frozen, ...)


def join_params(train_params: nnx.State, frozen_params: nnx.State) -> nnx.State:
  return nnx.merge_state(train_params, frozen_params)


# -- the step -------------------------------------------------------------------------------------
def step_config(config: TrainConfig) -> TrainConfig:
  """The part of a TrainConfig the compiled step depends on (bookkeeping fields normalised), so
  runs that differ only in paths, logging or checkpointing share one compilation."""
  return config.replace(seed=0, save_every=1, keep_checkpoints=None, log_every=1, checkpoint_dir=None,
                        metrics_path=None)


def init_opt_state(train_params, config: TrainConfig, mesh):
  """Optimizer state for the trainable parameters, placed like them (moments by logical axes)."""
  abstract = jax.eval_shape(make_optimizer(config).init, train_params)
  sh = shardings_of(abstract, mesh)
  init = jax.jit(make_optimizer(config).init, out_shardings=sh)
  return init(train_params)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "loss_fn", "mesh"),
                   donate_argnames=("train_params", "opt_state"))
def train_step(graphdef, train_params, frozen_params, opt_state, rng, step, micro_batches, *, config: TrainConfig,
               loss_fn, mesh=None):
  """One optimizer update. Returns (train_params, opt_state, metrics).

  rng: raw key data (uint32 [2]); micro-batch a of step s gets key split(fold_in(key, s), A)[a].
  step: int32 scalar, the number of updates done before this one (= the data step).
  micro_batches: {name: [A, B, T]} (see data.py). metrics: float32 scalars: every `sums` entry of
  the loss divided by the weight (e.g. loss, accuracy), "weight", "grad_norm" (before clipping)
  and "lr" (the learning rate of this update).
  """
  TRACES["train_step"] += 1
  with use_mesh(mesh):
    num_micro = micro_batches["tokens"].shape[0]
    keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng), step), num_micro)

    def objective(tp, mb, key):
      model = nnx.merge(graphdef, tp, frozen_params)
      loss_sum, sums = loss_fn(model, mb, key)
      return loss_sum.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in sums.items()}

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (_, sums_shape), _ = jax.eval_shape(grad_fn, train_params, first, keys[0])
    if "weight" not in sums_shape:
      raise ValueError(f"loss_fn must return sums with a 'weight' entry (the normaliser); got {sorted(sums_shape)}")
    zero_grads = _constrain_vars(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params))
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in sums_shape}

    def micro_step(carry, xs):
      grads_acc, sums_acc = carry
      mb, key = xs
      (_, sums), grads = grad_fn(train_params, mb, key)
      grads_acc = _constrain_vars(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads))
      return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    (grads_sum, sums), _ = jax.lax.scan(micro_step, (zero_grads, zero_sums), (micro_batches, keys))
    weight = sums["weight"]
    denom = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads_sum, train_params)
    grad_norm = optax.tree.norm(grads).astype(jnp.float32)
    updates, opt_state = make_optimizer(config).update(grads, opt_state, train_params)
    train_params = _constrain_vars(optax.apply_updates(train_params, updates))
    opt_state = _constrain_vars(opt_state)
    metrics = {**mean_metrics(sums), "weight": weight, "grad_norm": grad_norm,
               "lr": jnp.asarray(make_schedule(config)(step), jnp.float32)}
    return train_params, opt_state, metrics
