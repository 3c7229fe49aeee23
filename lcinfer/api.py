"""The public facade: `llm = lcinfer.load(path)`, `llm.logits(ids)`, `llm.generate(prompts)`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcinfer import attention as attn_lib
from lcinfer import engine
from lcinfer.checkpoint.convert import is_converted, read_marker, restore_arrays
from lcinfer.checkpoint import params as P
from lcinfer.checkpoint.tokenizer import Tokenizer
from lcinfer.config import ModelConfig
from lcinfer.engine.sampling import Sampling
from lcinfer.errors import CheckpointError, ConfigError
from lcinfer.kv.cache import KVCache, init_cache
from lcinfer.models import build_model
from lcinfer.sharding import use_mesh


@dataclasses.dataclass
class GenerateOutput:
  tokens: list[np.ndarray]  # new token ids per prompt (the stop token included when one was hit)
  texts: list[str] | None  # decoded new text per prompt, when a tokenizer is available

  def __iter__(self):
    return iter(self.texts if self.texts is not None else self.tokens)


class LLM:
  """A loaded model: config, parameters (NNX graphdef + state), optional tokenizer and mesh."""

  def __init__(self, config: ModelConfig, graphdef, params, *, tokenizer: Tokenizer | None = None, mesh=None,
               attention: str = "auto", stop_ids: Sequence[int] | None = None, dtype="float32"):
    self.config, self.graphdef, self.params = config, graphdef, params
    self.tokenizer, self.mesh, self.dtype = tokenizer, mesh, jnp.dtype(P.parse_dtype(dtype))
    self.attention_name = attention
    self.prefill_attention = attn_lib.resolve(attention, config, mesh, "prefill")
    self.decode_attention = attn_lib.resolve(attention, config, mesh, "decode")
    self.stop_ids = tuple(config.eos_token_ids if stop_ids is None else stop_ids)

  # -- construction ------------------------------------------------------------------------------
  @staticmethod
  def random(config: ModelConfig, *, dtype="float32", seed: int = 0, mesh=None, **kw) -> "LLM":
    """Randomly initialised weights (benchmarks, tests)."""
    model = build_model(config, dtype=jnp.dtype(P.parse_dtype(dtype)), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    if mesh is not None:
      arrays = {n: v.get_value() for n, (_, v) in P.flat_variables(state).items()}
      graphdef, state = P.build_state(config, arrays, dtype, mesh)
    return LLM(config, graphdef, state, mesh=mesh, dtype=dtype, **kw)

  # -- inference ---------------------------------------------------------------------------------
  def _ids(self, x) -> list[np.ndarray]:
    if isinstance(x, str):
      return [self._encode(x)]
    if isinstance(x, np.ndarray | jax.Array) and np.ndim(x) == 1:
      return [np.asarray(x, np.int32)]
    if isinstance(x, np.ndarray | jax.Array):
      return [np.asarray(r, np.int32) for r in np.asarray(x)]
    out = []
    for p in x:
      out.append(self._encode(p) if isinstance(p, str) else np.asarray(p, np.int32))
    return out

  def _encode(self, text: str) -> np.ndarray:
    if self.tokenizer is None:
      raise ConfigError("this model has no tokenizer files; pass token ids instead of strings")
    return np.asarray(self.tokenizer.encode(text), np.int32)

  def _check_ids(self, rows: list[np.ndarray]) -> None:
    for r in rows:
      if r.size and (r.min() < 0 or r.max() >= self.config.vocab_size):
        raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got {r.min()}..{r.max()}")

  def logits(self, token_ids) -> np.ndarray:
    """[B, T, vocab] float32 logits of whole sequences (rows of equal length), no cache."""
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"token_ids must be [T] or [B, T], got shape {ids.shape}")
    self._check_ids(list(ids))
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    with use_mesh(self.mesh):
      out = engine.forward_logits(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(pos),
                                  attention=self.prefill_attention)
    return np.asarray(out)

  def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
    return init_cache(self.config, batch, capacity, self.dtype if dtype is None else dtype)

  def _gen_kwargs(self, max_new_tokens, sampling, stop, seed, capacity, chunk_size, progress):
    stop_ids = self.stop_ids if stop is None else tuple(stop)
    return dict(attention_prefill=self.prefill_attention, attention_decode=self.decode_attention,
                max_new_tokens=max_new_tokens, sampling=Sampling.parse(sampling), stop_ids=stop_ids, seed=seed,
                capacity=capacity, cache_dtype=self.dtype, config=self.config, chunk_size=chunk_size,
                progress=progress)

  def generate(self, prompts, max_new_tokens: int = 32, sampling="greedy", *, stop: Sequence[int] | None = None,
               seed: int = 0, capacity: int | None = None, chunk_size: int | None = None,
               progress: bool = False) -> GenerateOutput:
    """New tokens (and text) for each prompt: a string, a list of strings, or token-id arrays.

    sampling: "greedy", a Sampling, a dict, or "temperature=0.7,top_k=50,top_p=0.9".
    stop: stop token ids (default: the checkpoint's EOS ids); [] disables stopping.
    """
    rows = self._ids(prompts)
    self._check_ids(rows)
    with use_mesh(self.mesh):
      gen = engine.generate(self.graphdef, self.params, rows,
                            **self._gen_kwargs(max_new_tokens, sampling, stop, seed, capacity, chunk_size, progress))
    texts = None if self.tokenizer is None else [self.tokenizer.decode(t) for t in gen.tokens]
    return GenerateOutput(tokens=gen.tokens, texts=texts)

  def stream(self, prompts, max_new_tokens: int = 32, sampling="greedy", *, stop=None, seed: int = 0,
             capacity=None, chunk_size=None, every: int = 1, progress: bool = False) -> Iterator[np.ndarray]:
    """Yield [B, k] arrays of new token ids as they are produced (-1 for rows that are done)."""
    rows = self._ids(prompts)
    self._check_ids(rows)
    kw = self._gen_kwargs(max_new_tokens, sampling, stop, seed, capacity, chunk_size, progress)
    with use_mesh(self.mesh):
      yield from engine.stream(self.graphdef, self.params, rows, every=every, **kw)


def load(path: str | Path, dtype: str = "bfloat16", mesh=None, attention: str = "auto") -> LLM:
  """Load a converted lcinfer checkpoint or a Hugging Face directory (safetensors)."""
  p = Path(path)
  if not p.exists():
    raise CheckpointError(f"{p} does not exist")
  if not p.is_dir():
    raise CheckpointError(f"{p} is not a directory (expected a checkpoint directory)")
  P.parse_dtype(dtype)
  config = ModelConfig.from_hf(p)
  if is_converted(p):
    read_marker(p)
    arrays = restore_arrays(p, config, P.parse_dtype(dtype), mesh)
  else:
    arrays = P.read_hf_arrays(p, config)
  graphdef, state = P.build_state(config, arrays, dtype, mesh)
  tokenizer = None
  if (p / "tokenizer.json").exists() or (p / "tokenizer.model").exists():
    tokenizer = Tokenizer.from_dir(p)
  stop = None
  gc = p / "generation_config.json"
  if gc.exists():
    try:
      eos = json.loads(gc.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{gc} is not valid JSON: {e}") from None
    if eos is not None:
      stop = [eos] if isinstance(eos, int) else list(eos)
  return LLM(config, graphdef, state, tokenizer=tokenizer, mesh=mesh, attention=attention, stop_ids=stop,
             dtype=dtype)
