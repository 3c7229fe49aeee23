"""Batched generation: prefill, then a `lax.while_loop` of decode steps, all on device.

The loop state is a pytree (cache, output buffer, step, done flags, rng). One compiled loop serves
a whole generation and streaming too: the loop runs until a dynamic `stop_step`, so a stream calls
the same executable again for the next few tokens. Stop tokens are data (a padded int32 array),
so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcinfer.engine import core
from lcinfer.engine.sampling import Sampling, sample
from lcinfer.errors import CapacityError
from lcinfer.kv.cache import KVCache, init_cache

MAX_STOP_IDS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenState:
  cache: KVCache
  tokens: jax.Array  # [B, N] int32 generated ids, -1 where none
  last: jax.Array  # [B] int32 the token to feed next
  step: jax.Array  # [] int32 tokens generated so far (per row, until done)
  done: jax.Array  # [B] bool
  rng: jax.Array


def _record(state: GenState, logits_BV, stop_ids, max_new, sampling: Sampling) -> GenState:
  rng, sub = jax.random.split(state.rng)
  tok = sample(logits_BV, sub, sampling)
  tok = jnp.where(state.done, -1, tok)
  tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (jnp.int32(0), state.step))
  hit_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1) & (tok >= 0)
  step = state.step + 1
  done = state.done | hit_stop | (step >= max_new)
  return GenState(cache=state.cache, tokens=tokens, last=jnp.maximum(tok, 0), step=step, done=done, rng=rng)


@functools.partial(jax.jit, static_argnames=("sampling",), donate_argnames=("state",))
def _first_token(state: GenState, logits_BV, stop_ids, max_new, *, sampling):
  return _record(state, logits_BV, stop_ids, max_new, sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "sampling"), donate_argnames=("state",))
def decode_loop(graphdef, params, state: GenState, stop_ids, max_new, stop_step, *, attention, sampling):
  """Decode until every row is done or `stop_step` tokens exist. Compiled once per shape."""
  core.TRACES["decode_loop"] += 1

  def cond(s):
    return (s.step < stop_step) & ~jnp.all(s.done)

  def body(s):
    logits, cache = core.decode_logits(graphdef, params, s.last, s.cache, attention)
    return _record(dataclasses.replace(s, cache=cache), logits, stop_ids, max_new, sampling)

  return jax.lax.while_loop(cond, body, state)


def _bucket(n: int, q: int) -> int:
  return int(-(-n // q) * q)


@dataclasses.dataclass
class Generation:
  """What `generate` returns: new token ids per prompt (stop token included), and the cache."""

  tokens: list[np.ndarray]
  cache: KVCache | None = None


def stream(graphdef, params, prompts: Sequence[Sequence[int]], *, attention_prefill, attention_decode,
           max_new_tokens: int, sampling: Sampling, stop_ids: Sequence[int] = (), seed: int = 0,
           capacity: int | None = None, cache_dtype=jnp.bfloat16, config=None, chunk_size: int | None = None,
           every: int = 1, progress: bool = False) -> Iterator[np.ndarray]:
  """Yield [B, k] arrays of new tokens (-1 for rows already done) as they are generated."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if len(stop_ids) > MAX_STOP_IDS:
    raise ValueError(f"at most {MAX_STOP_IDS} stop tokens, got {len(stop_ids)}")
  tokens_BP, lengths = core.pad_prompts(prompts, pad_to_multiple=16)
  b, p = tokens_BP.shape
  if chunk_size is not None and chunk_size < p:
    p = _bucket(p, chunk_size)
    tokens_BP = np.pad(tokens_BP, ((0, 0), (0, p - tokens_BP.shape[1])))
  n_buf = _bucket(max_new_tokens, 64)
  needed = p + max_new_tokens
  if capacity is None:
    capacity = _bucket(needed, 128)
  if needed > capacity:
    raise CapacityError(
        f"longest prompt ({int(lengths.max())} tokens, padded to {p}) + max_new_tokens ({max_new_tokens}) = "
        f"{needed} exceeds the cache capacity {capacity}; raise capacity or shorten the prompt")
  cache = init_cache(config, b, capacity, cache_dtype)
  logits, cache = core.prefill(graphdef, params, tokens_BP, lengths, cache, attention=attention_prefill,
                               chunk_size=chunk_size, progress=progress)
  stops = np.full((MAX_STOP_IDS,), -1, np.int32)
  stops[: len(stop_ids)] = np.asarray(stop_ids, np.int32)
  stops = jnp.asarray(stops)
  max_new = jnp.int32(max_new_tokens)
  state = GenState(cache=cache, tokens=jnp.full((b, n_buf), -1, jnp.int32), last=jnp.zeros((b,), jnp.int32),
                   step=jnp.int32(0), done=jnp.zeros((b,), bool), rng=jax.random.key(seed))
  state = _first_token(state, logits, stops, max_new, sampling=sampling)
  reencode = _reencode_steps(config, lengths, max_new_tokens)
  emitted = 0
  while True:
    step = int(state.step)
    if step > emitted:
      yield np.asarray(state.tokens[:, emitted:step])
      emitted = step
    if step >= max_new_tokens or bool(jnp.all(state.done)):
      return
    if reencode and step == reencode[0]:
      reencode.pop(0)
      state = _reencode(graphdef, params, state, prompts, step, capacity, config, cache_dtype, attention_prefill,
                        stops, max_new, sampling)
      continue
    stop_step = min(step + every, max_new_tokens, *reencode[:1])
    state = decode_loop(graphdef, params, state, stops, max_new, jnp.int32(stop_step),
                        attention=attention_decode, sampling=sampling)


def _reencode_steps(config, lengths, max_new_tokens) -> list[int]:
  """LongRoPE (Phi-3): the steps at which a row first grows past original_max_position_embeddings.

  There transformers drops the cache and re-encodes the whole sequence with the long factors
  (Phi3ForCausalLM.prepare_inputs_for_generation); lcinfer does the same, so that keys cached with
  the short factors are never mixed with queries using the long ones.
  """
  if config is None or config.rope.rope_type != "longrope":
    return []
  orig = config.rope.original_max_position_embeddings
  return sorted({int(orig + 1 - n) for n in lengths if 1 <= orig + 1 - n < max_new_tokens})


def _reencode(graphdef, params, state: GenState, prompts, step, capacity, config, cache_dtype, attention,
              stops, max_new, sampling) -> GenState:
  gen = np.asarray(state.tokens[:, :step])
  seqs = [np.concatenate([np.asarray(p, np.int32), g[g >= 0]]) for p, g in zip(prompts, gen)]
  toks, lens = core.pad_prompts(seqs, pad_to_multiple=16)
  cap = max(capacity, _bucket(toks.shape[1] + int(max_new) - step, 128))
  cache = init_cache(config, len(seqs), cap, cache_dtype)
  logits, cache = core.prefill(graphdef, params, toks, lens, cache, attention=attention)
  return _first_token(dataclasses.replace(state, cache=cache), logits, stops, max_new, sampling=sampling)


def generate(graphdef, params, prompts, **kw) -> Generation:
  """All new tokens per prompt, each cut after its first stop token."""
  parts = list(stream(graphdef, params, prompts, every=kw.pop("every", 1 << 30), **kw))
  allt = np.concatenate(parts, axis=1) if parts else np.zeros((len(prompts), 0), np.int32)
  out = []
  for row in allt:
    valid = row[row >= 0]
    out.append(valid.astype(np.int32))
  return Generation(tokens=out)
