"""KV caches (pytrees) and, later, the presses that quantize, evict and merge them in-graph."""

from lcinfer.kv.cache import KVCache, LayerKV, cache_logical_axes, init_cache

__all__ = ["KVCache", "LayerKV", "cache_logical_axes", "init_cache"]
