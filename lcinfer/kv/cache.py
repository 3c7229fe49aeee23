"""The KV cache: a pytree of fixed capacity, passed into prefill/decode and returned (donated).

Per layer `k, v [B, K, C, D]` and `pos [B, K, C]` (int32 RoPE position of each slot, -1 = empty).
Masks come from `pos`, never from slot order, so a press may reorder, drop or merge slots per head.
`write_index` is the next slot to write (shared by the batch: prompts are right-padded, padding
slots hold pos = -1); `next_pos [B]` is the position the next token of each row will take.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcinfer.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
  k: jax.Array  # [B, K, C, D]
  v: jax.Array  # [B, K, C, D]
  pos: jax.Array  # [B, K, C] int32, -1 = empty

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  def write(self, k_BTKD: jax.Array, v_BTKD: jax.Array, pos_BT: jax.Array, slot) -> "LayerKV":
    """Write T new tokens at slots [slot, slot + T). The caller guarantees slot + T <= capacity."""
    k_new = jnp.swapaxes(k_BTKD, 1, 2).astype(self.k.dtype)
    v_new = jnp.swapaxes(v_BTKD, 1, 2).astype(self.v.dtype)
    kh = self.k.shape[1]
    pos_new = jnp.broadcast_to(pos_BT[:, None, :], (pos_BT.shape[0], kh, pos_BT.shape[1])).astype(jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    slot = jnp.asarray(slot, jnp.int32)
    return LayerKV(
        k=jax.lax.dynamic_update_slice(self.k, k_new, (zero, zero, slot, zero)),
        v=jax.lax.dynamic_update_slice(self.v, v_new, (zero, zero, slot, zero)),
        pos=jax.lax.dynamic_update_slice(self.pos, pos_new, (zero, zero, slot)),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  layers: tuple[LayerKV, ...]
  write_index: jax.Array  # [] int32: next slot to write
  next_pos: jax.Array  # [B] int32: position of each row's next token

  @property
  def capacity(self) -> int:
    return self.layers[0].capacity

  @property
  def batch(self) -> int:
    return self.next_pos.shape[0]

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> KVCache:
  """An empty cache: zeros for K/V, -1 for every position."""
  if batch <= 0 or capacity <= 0:
    raise ValueError(f"batch and capacity must be positive, got batch={batch}, capacity={capacity}")
  shape = (batch, config.num_kv_heads, capacity, config.head_dim)

  def layer():
    return LayerKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.full(shape[:3], -1, jnp.int32))

  return KVCache(layers=tuple(layer() for _ in range(config.num_layers)),
                 write_index=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch,), jnp.int32))


def cache_logical_axes() -> dict[str, tuple[str, ...]]:
  """Logical axis names of the cache arrays, for sharding rules."""
  return {"k": ("batch", "kv_heads", "cache_seq", "head_dim"),
          "v": ("batch", "kv_heads", "cache_seq", "head_dim"),
          "pos": ("batch", "kv_heads", "cache_seq")}
