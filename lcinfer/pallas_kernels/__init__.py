"""Pallas kernels and their pure-jnp reference oracles (ARCHITECTURE.md principle 5).

Raw and unbatched-in-spirit: layout [B, T, H, D] for queries and [B, S, K, D] for keys/values at
the API, GQA from head counts (K/V never repeated in memory), `interpret=` threaded through every
kernel so CPU CI runs them. No model code here.

    from lcinfer.pallas_kernels import dispatch
    out_BTHD, lse_BTH = dispatch.call("flash_attention", ("triton", "xla"), q, k, v, scale=...,
                                      causal=True, interpret=False)
"""

from lcinfer.pallas_kernels import dispatch  # noqa: F401
from lcinfer.pallas_kernels.reference import attention_reference  # noqa: F401
from lcinfer.pallas_kernels import flash_triton  # noqa: F401  (registers "flash_attention"/"triton")
from lcinfer.pallas_kernels.reference import block_sparse_reference  # noqa: F401
from lcinfer.pallas_kernels.sparse_index import (BlockSparse, Columns, blocks_from_mask,  # noqa: F401
                                                 vertical_slash_to_layout)
from lcinfer.pallas_kernels.vertical_slash import KeyRanges, vertical_slash_to_ranges  # noqa: F401
from lcinfer.pallas_kernels import block_sparse  # noqa: F401  (registers "block_sparse_attention")
from lcinfer.pallas_kernels import diagonals  # noqa: F401  (registers "diagonal_attention")
from lcinfer.pallas_kernels import diagonals_xla  # noqa: F401  (registers "diagonal_attention"/"xla")
from lcinfer.pallas_kernels.diagonals import exact_vertical_slash_attention  # noqa: F401
from lcinfer.pallas_kernels import flash_mgpu  # noqa: F401  (registers the "mosaic_gpu" implementations)
from lcinfer.pallas_kernels import decode  # noqa: F401  (registers "decode_attention")
from lcinfer.pallas_kernels.decode import decode_attention, decode_reference  # noqa: F401
from lcinfer.pallas_kernels import quant  # noqa: F401  (quantized cache layouts)
from lcinfer.pallas_kernels import tpu_block_sparse  # noqa: F401  (registers the "tpu" implementations)
from lcinfer.pallas_kernels import tpu_diagonals  # noqa: F401  (registers "diagonal_attention"/"tpu")
from lcinfer.pallas_kernels import tpu_decode  # noqa: F401  (registers "decode_attention"/"tpu")
from lcinfer.pallas_kernels.decode_quant import (quantized_decode_attention,  # noqa: F401
                                                 quantized_decode_reference)
from lcinfer.pallas_kernels import decode_quant_mgpu  # noqa: F401  (registers its "mosaic_gpu" implementation)

__all__ = ["attention_reference", "dispatch", "flash_triton", "flash_mgpu", "block_sparse", "block_sparse_reference",
           "BlockSparse", "Columns", "blocks_from_mask", "vertical_slash_to_layout", "decode",
           "decode_attention", "decode_reference",
           "quant", "quantized_decode_attention", "quantized_decode_reference", "decode_quant_mgpu", "tpu_block_sparse",
           "tpu_decode", "tpu_diagonals",
           "KeyRanges", "vertical_slash_to_ranges", "diagonals", "diagonals_xla", "exact_vertical_slash_attention"]
