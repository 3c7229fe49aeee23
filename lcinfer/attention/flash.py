"""Flash attention (Dao 2023, FlashAttention-2) through lcinfer's own Pallas kernels
(`lcinfer.pallas_kernels.flash_triton` on GPUs, `tpu_block_sparse.tpu_flash_attention` on TPUs),
called through the kernel dispatcher so that calls the kernels do not cover fall back to the
float32 reference ("xla").

Not an "auto" choice (cuDNN stays the default prefill on GPU): ask for it by name, or build
`FlashAttention(interpret=True)` to run the same kernel on CPU in tests.

Positions -> kernel masks: like "cudnn", the kernel masks by slot index, which equals the position
mask for a prefill whose positions increase by one along each row (any start), with padding
(position -1) anywhere. Padding becomes sentinel segment ids that never match, so a padded query
sees nothing (out 0, lse -inf) and a padded key is seen by no query, as `base.visible` says.
Calls with T != S (queries over a longer key set) go to the dense XLA method.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lcinfer.attention import base
from lcinfer.attention.dense import DENSE
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.flash_triton import SUPPORTED_HEAD_DIMS


_Q_PAD = int(np.iinfo(np.int32).min) + 2   # distinct from the kernel's own tail sentinels
_KV_PAD = int(np.iinfo(np.int32).min) + 3


@dataclasses.dataclass(frozen=True)
class FlashAttention:
  """Pallas flash-attention prefill. `implementations` is the dispatcher order (None: kernel, then
  reference); `interpret` None follows the `base.PALLAS_INTERPRET` switch."""

  name: str = "flash"
  interpret: bool | None = None
  implementations: tuple[str, ...] | None = ("triton", "tpu", "xla")
  block_q: int | None = None
  block_k: int | None = None

  @property
  def _interpret(self) -> bool:
    return base.pallas_interpret(self.interpret)

  def supports(self, config, mesh, phase):
    if phase != "prefill":
      return "flash (Pallas) serves prefill only; decode over a cache uses another method"
    if not self._interpret and not (base.gpu_available() or base.tpu_available()):
      return ("needs a GPU or a TPU (use interpret mode in tests: FlashAttention(interpret=True) or "
              "LCINFER_PALLAS_INTERPRET=1)")
    if mesh is not None and mesh.size > 1:
      return "not wired for a multi-device mesh yet"
    if config is not None and config.head_dim not in SUPPORTED_HEAD_DIMS:
      return (f"the flash kernel takes head_dim in {SUPPORTED_HEAD_DIMS}, got {config.head_dim}")
    return None

  def prefill(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, scale, window=None,
              q_seg_BT=None, kv_seg_BS=None, need_lse=True):
    del need_lse  # lse comes at no extra cost here
    t, s = q_BTHD.shape[1], k_BSKD.shape[1]
    if t != s:
      return DENSE.prefill(q_BTHD, k_BSKD, v_BSKD, q_pos_BT=q_pos_BT, kv_pos_BS=kv_pos_BS, scale=scale,
                           window=window, q_seg_BT=q_seg_BT, kv_seg_BS=kv_seg_BS)
    q_seg = jnp.zeros(q_pos_BT.shape, jnp.int32) if q_seg_BT is None else q_seg_BT.astype(jnp.int32)
    kv_seg = jnp.zeros(kv_pos_BS.shape, jnp.int32) if kv_seg_BS is None else kv_seg_BS.astype(jnp.int32)
    q_seg = jnp.where(q_pos_BT >= 0, q_seg, _Q_PAD)
    kv_seg = jnp.where(kv_pos_BS >= 0, kv_seg, _KV_PAD)
    kw = {}
    if self.block_q is not None:
      kw["block_q"] = self.block_q
    if self.block_k is not None:
      kw["block_k"] = self.block_k
    out, lse = dispatch.call("flash_attention", self.implementations, q_BTHD, k_BSKD, v_BSKD,
                             scale=float(scale), causal=True, window=window, q_segment_ids=q_seg,
                             kv_segment_ids=kv_seg, interpret=self._interpret,
                             **kw)
    return out.astype(q_BTHD.dtype), lse

  def decode(self, q_BTHD, k_BKCD, v_BKCD, *, q_pos_BT, kv_pos_BKC, scale, window=None):
    raise NotImplementedError("flash serves prefill only; resolve a decode method with phase='decode'")


FLASH = base.register(FlashAttention())
