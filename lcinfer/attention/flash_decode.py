"""Flash-decoding (Dao et al. 2023): decode over a long cache through lcinfer's Pallas split-K
kernels (`lcinfer.pallas_kernels.decode` on GPUs, `tpu_decode` on TPUs), called through the kernel
dispatcher so that calls the kernels do not cover fall back to the float32 reference ("xla").

Prefill defers to the dense XLA method. Not an "auto" choice: ask for it by name, or build
`FlashDecode(interpret=True)` to run the same kernel on CPU in tests. Masks come from the cache
positions (any slot order, -1 = empty), exactly as `base.visible` says.
"""

from __future__ import annotations

import dataclasses

from lcinfer.attention import base
from lcinfer.attention.dense import DENSE
from lcinfer.pallas_kernels import dispatch
from lcinfer.pallas_kernels.decode import SUPPORTED_HEAD_DIMS



@dataclasses.dataclass(frozen=True)
class FlashDecode:
  """Pallas flash-decoding. `implementations` is the dispatcher order; `interpret` None follows the
  `base.PALLAS_INTERPRET` switch; `num_splits` / `block_k` None pick from the device."""

  name: str = "flash_decode"
  interpret: bool | None = None
  implementations: tuple[str, ...] | None = ("triton", "tpu", "xla")
  num_splits: int | None = None
  block_k: int | None = None

  @property
  def _interpret(self) -> bool:
    return base.pallas_interpret(self.interpret)

  def supports(self, config, mesh, phase):
    if phase not in base.PHASES:
      return f"unknown phase {phase!r}"
    if not self._interpret and not (base.gpu_available() or base.tpu_available()):
      return ("needs a GPU or a TPU (use interpret mode in tests: FlashDecode(interpret=True) or "
              "LCINFER_PALLAS_INTERPRET=1)")
    if mesh is not None and mesh.size > 1:
      return "not wired for a multi-device mesh yet"
    if phase == "decode" and config is not None and config.head_dim not in SUPPORTED_HEAD_DIMS:
      return f"the flash-decoding kernel takes head_dim in {SUPPORTED_HEAD_DIMS}, got {config.head_dim}"
    return None

  def prefill(self, q_BTHD, k_BSKD, v_BSKD, *, q_pos_BT, kv_pos_BS, scale, window=None,
              q_seg_BT=None, kv_seg_BS=None, need_lse=True):
    del need_lse  # lse comes at no extra cost here
    return DENSE.prefill(q_BTHD, k_BSKD, v_BSKD, q_pos_BT=q_pos_BT, kv_pos_BS=kv_pos_BS, scale=scale,
                         window=window, q_seg_BT=q_seg_BT, kv_seg_BS=kv_seg_BS)

  def decode(self, q_BTHD, k_BKCD, v_BKCD, *, q_pos_BT, kv_pos_BKC, scale, window=None):
    out, lse = dispatch.call("decode_attention", self.implementations, q_BTHD, k_BKCD, v_BKCD,
                             kv_pos_BKC, q_pos_BT, scale=float(scale), window=window,
                             num_splits=self.num_splits, block_k=self.block_k,
                             interpret=self._interpret)
    return out.astype(q_BTHD.dtype), lse


FLASH_DECODE = base.register(FlashDecode())
