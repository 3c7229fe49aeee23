"""Jitted model steps over (graphdef, params): full-sequence logits, prefill (whole or in chunks)
into a cache, and the single-token decode step. Each is compiled once per shape; the cache is
donated so XLA updates it in place.

Prompts of a batch are right-padded to a common length P: padding tokens get position -1, so
they are invisible to attention and their cache slots stay empty. After prefill the cache's
`write_index` is P and `next_pos[b]` is the length of prompt b.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lcinfer.errors import CapacityError
from lcinfer.kv.cache import KVCache

# How many times each step function was traced (= compiled per new shape). Tests read this.
TRACES: collections.Counter = collections.Counter()


def _last_valid_hidden(h_BTE, positions_BT):
  idx = jnp.argmax(positions_BT, axis=1)  # positions increase along a row; padding is -1
  return jnp.take_along_axis(h_BTE, idx[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def forward_logits(graphdef, params, tokens_BT, positions_BT, segment_ids_BT=None, *, attention):
  """Logits [B, T, V] (float32) of a whole sequence, no cache."""
  TRACES["forward_logits"] += 1
  model = nnx.merge(graphdef, params)
  h, _ = model(tokens_BT, positions_BT, attention=attention, segment_ids_BT=segment_ids_BT)
  return model.logits(h)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "fresh", "all_logits"),
                   donate_argnames=("cache",))
def prefill_step(graphdef, params, tokens_BT, positions_BT, cache: KVCache, *, attention, fresh: bool,
                 all_logits: bool = False):
  """Write a (chunk of a) prompt into the cache. Returns (logits, cache): logits [B, V] at each
  row's last valid token of this chunk, or [B, T, V] with all_logits."""
  TRACES["prefill_step"] += 1
  model = nnx.merge(graphdef, params)
  h, cache = model(tokens_BT, positions_BT, attention=attention, cache=cache, fresh=fresh)
  if all_logits:
    return model.logits(h), cache
  return model.logits(_last_valid_hidden(h, positions_BT)), cache


def decode_logits(graphdef, params, tokens_B, cache: KVCache, attention):
  """One token per row at position cache.next_pos (traceable; used inside the generate loop)."""
  model = nnx.merge(graphdef, params)
  positions = cache.next_pos[:, None]
  h, cache = model(tokens_B[:, None], positions, attention=attention, cache=cache, fresh=False)
  return model.logits(h[:, 0]), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"), donate_argnames=("cache",))
def decode_step(graphdef, params, tokens_B, cache: KVCache, *, attention):
  """Append one token per row; returns (logits [B, V] float32, cache)."""
  TRACES["decode_step"] += 1
  return decode_logits(graphdef, params, tokens_B, cache, attention)


def pad_prompts(prompts, pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad a list of 1-D token arrays: (tokens [B, P] int32 with 0 padding, lengths [B])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if len(prompts) == 0 or lengths.min() == 0:
    raise ValueError("every prompt needs at least one token")
  p = int(-(-lengths.max() // pad_to_multiple) * pad_to_multiple)
  tokens = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    tokens[i, : len(x)] = np.asarray(x, np.int32)
  return tokens, lengths


def positions_for(lengths_B: np.ndarray, width: int, start: np.ndarray | int = 0) -> np.ndarray:
  """Positions start + [0, width) per row, -1 beyond each row's length."""
  ar = np.arange(width, dtype=np.int32)[None, :]
  start = np.broadcast_to(np.asarray(start, np.int32), lengths_B.shape)[:, None]
  return np.where(ar < lengths_B[:, None], start + ar, -1).astype(np.int32)


def prefill(graphdef, params, tokens_BP, lengths_B, cache: KVCache, *, attention, chunk_size: int | None = None,
            progress: bool = False, all_logits: bool = False):
  """Prefill right-padded prompts into `cache` after what it already holds.

  Returns (logits, cache): logits [B, V] at each prompt's last token (or [B, P, V] with
  all_logits, whole prefill only). With chunk_size, the prompt goes in fixed-size chunks (one
  compile), each attending over the cache; the last chunk is padded.
  """
  tokens_BP = np.asarray(tokens_BP, np.int32)
  lengths_B = np.asarray(lengths_B, np.int32)
  if tokens_BP.ndim != 2 or tokens_BP.shape[1] == 0:
    raise ValueError(f"tokens must be [B, P] with P >= 1, got shape {tokens_BP.shape}")
  b, p = tokens_BP.shape
  if b != cache.batch:
    raise ValueError(f"batch of {b} prompts for a cache of batch {cache.batch}")
  start_slot = int(cache.write_index)
  start_pos = np.asarray(cache.next_pos)
  fresh_cache = start_slot == 0
  chunk = p if chunk_size is None or chunk_size >= p else int(chunk_size)
  n_chunks = -(-p // chunk)
  needed = start_slot + n_chunks * chunk
  if needed > cache.capacity:
    raise CapacityError(
        f"prompt of {p} tokens (in {n_chunks} chunk(s) of {chunk}) after {start_slot} cached slots needs "
        f"{needed} slots; the cache holds {cache.capacity}. Use a larger capacity or a shorter prompt.")
  if all_logits and n_chunks > 1:
    raise ValueError("all_logits needs a single-chunk prefill")
  logits = None
  bar = tqdm(total=p, desc="prefill", unit="tok", disable=not progress or n_chunks == 1)
  for c in range(n_chunks):
    lo = c * chunk
    toks = np.zeros((b, chunk), np.int32)
    width = min(chunk, p - lo)
    toks[:, :width] = tokens_BP[:, lo:lo + width]
    rem = np.clip(lengths_B - lo, 0, chunk)
    pos = positions_for(rem, chunk, start_pos + lo)
    out, cache = prefill_step(graphdef, params, jnp.asarray(toks), jnp.asarray(pos), cache, attention=attention,
                              fresh=fresh_cache and c == 0, all_logits=all_logits)
    if logits is None or all_logits:
      logits = out
    else:
      logits = jnp.where(jnp.asarray(rem > 0)[:, None], out, logits)
    bar.update(width)
  bar.close()
  # next_pos from the model is the last valid position + 1 of the last chunk that had one: right.
  return logits, cache
