"""Attention methods: a protocol, a registry, and the implementations.

    from lcinfer import attention
    method = attention.resolve("auto", config, mesh=None, phase="prefill")
    out_BTHD, lse_BTH = method.prefill(q, k, v, q_pos_BT=..., kv_pos_BS=..., scale=...)

Adding a method: one file here defining a frozen dataclass with `name`, `supports`, `prefill`
and `decode`, registered with `base.register(...)`, and one import line below.
"""

from lcinfer.attention.base import (AttentionMethod, available, get, merge_attention, register,
                                    resolve, visible)
from lcinfer.attention import dense as _dense  # noqa: F401  (registers "dense")
from lcinfer.attention import cudnn as _cudnn  # noqa: F401  (registers "cudnn")
from lcinfer.attention import flash as _flash  # noqa: F401  (registers "flash")
from lcinfer.attention import flash_decode as _flash_decode  # noqa: F401  (registers "flash_decode")

__all__ = ["AttentionMethod", "available", "get", "merge_attention", "register", "resolve", "visible"]
