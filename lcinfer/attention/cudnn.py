"""Dense causal attention through cuDNN's fused flash attention (`jax.nn.dot_product_attention`,
implementation="cudnn"; Dao et al. 2022, FlashAttention-2 algorithm), the default prefill on GPU.

It covers fresh causal prefill in bf16/fp16 with an optional sliding window; the mask is causal
by slot index, which equals the position mask for a prefill whose positions increase by one along
each row with padding at the end (how lcinfer's engine lays out prompts). Calls it does not cover
(segment ids, float32) go to the dense XLA reference; decode is left to other methods. cuDNN's softmax
statistic comes back in the output dtype; lse is returned in float32, and with need_lse=False (a model
layer) it is not computed at all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcinfer.attention import base
from lcinfer.attention.dense import DENSE


@dataclasses.dataclass(frozen=True)
class CudnnAttention:
  name: str = "cudnn"

  def supports(self, config, mesh, phase):
    if phase != "prefill":
      return "cuDNN flash attention serves prefill; decode over a cache uses another method"
    if not base.gpu_available():
      return "needs a CUDA GPU"
    if mesh is not None and mesh.size > 1:
      return "not wired for a multi-device mesh yet"
    if config is not None and config.head_dim > 256:
      return f"cuDNN flash attention takes head_dim <= 256, got {config.head_dim}"
    if config is not None and config.head_dim % 8:
      return f"cuDNN flash attention needs head_dim % 8 == 0, got {config.head_dim}"
    return None

  def prefill(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, scale, window=None,
              q_seg_BT=None, kv_seg_BS=None, need_lse=True):
    if (q_seg_BT is not None or q_BTHD.dtype not in (jnp.bfloat16, jnp.float16)
        or q_BTHD.shape[1] != k_BSKD.shape[1]):
      return DENSE.prefill(q_BTHD, k_BSKD, v_BSKD, q_pos_BT=q_pos_BT, kv_pos_BS=kv_pos_BS, scale=scale,
                           window=window, q_seg_BT=q_seg_BT, kv_seg_BS=kv_seg_BS)
    kw = dict(scale=scale, is_causal=True, local_window_size=None if window is None else (window - 1, 0),
              implementation="cudnn")
    if not need_lse:  # no softmax statistics written: the plain inference kernel
      return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, **kw), None
    out, lse = jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, return_residual=True, **kw)
    return out, lse.astype(jnp.float32)

  def decode(self, q_BTHD, k_BKCD, v_BKCD, *, q_pos_BT, kv_pos_BKC, scale, window=None):
    raise NotImplementedError("cudnn serves prefill only; resolve a decode method with phase='decode'")


CUDNN = base.register(CudnnAttention(), auto_priority=10)
