"""The launch geometry of the Hopper int4 KIVI decode kernel (`decode_quant_mgpu_kernel.py`): a frozen
dataclass of the call's shape, the split, the pipeline and the kernel's measured options (each
field's comment; measurements in `decode_quant_mgpu.py`'s docstring and benchmarks/NOTES.md).
`decode_quant_mgpu.geometry` builds it from a call."""

from __future__ import annotations

import dataclasses

from lcinfer.pallas_kernels import combine


@dataclasses.dataclass(frozen=True)
class Geometry:
  b: int
  kh: int
  rows: int            # G * T real query rows per kv head
  c: int
  block_k: int
  splits: int
  blocks_per_split: int
  stages: int
  group: int           # the keys' token group
  scale: float
  window: int | None
  lazy_max: bool = True  # keep the running max unless a logit exceeds it by LAZY_TAU, with speculative P:
                         # P computed in the current max before the vote, whose flags ride on the P
                         # fence (one warpgroup barrier per stage); a vote that finds a logit above
                         # redoes P after the rescale (module docstring)
  sub: int = 1           # 64-key blocks per TMA stage (2: half the copies and their barriers per key)
  q_direct: bool = False  # T = 1: queries straight from [B, 1, H, D], permuted in the kernel
  fused_combine: bool = False  # the splits combined by `combine.combine_partials` (padded split buffers)
  issue_warp: bool = True      # one warp issues a stage's copies, warp j % 4 for stage j
  pair: bool = True            # a stage's two blocks share one product wait, vote and P fence
  meta: int = 4                # stages per chunk of the small per-key copies (key scale rows, value scales,
                               # zeros, positions), which go through their own two-slot ring
  packed: bool = False         # G <= 4, one query, pair: a stage's two blocks share one [64, 8] logit tile,
                               # block 0's queries in columns 0-3, block 1's in 4-7 (its product takes the
                               # queries 4 rows down), so the softmax does no work on padded columns;
                               # each half runs its own online softmax, merged by lse at the end
  wide: bool = True            # code tiles as 128-byte TMA rows of two keys (128-byte swizzle), not one
                               # 64-byte row per key: the copies alone then stream at the bf16 kernel's
                               # rate (H200, 128K: 38.0 against 48.2 us without compute)
  probe: str = ""              # measurement only, the output is then not attention: "copies" (waits, no
                               # compute), "codes" (only the two code copies, no compute) or "keys" (keys
                               # unpacked, K Q^T, mask; no softmax or values)

  @property
  def code_rows(self) -> int:  # keys per row of the code tiles (TMA rows of 64 or 128 bytes)
    return 2 if self.wide else 1

  @property
  def code_swizzle(self) -> int:
    return 64 * self.code_rows

  @property
  def n_blocks(self) -> int:
    return self.c // self.block_k

  @property
  def out_splits(self) -> int:  # splits of the partial outputs: padded for the combination kernel
    return combine.padded_splits(self.splits, self.rows) if self.fused_combine else self.splits

  @property
  def n_q(self) -> int:  # the wgmma N side: query rows padded to 8, 16, 32 or 64
    return next(n for n in (8, 16, 32, 64) if n >= self.rows)

  @property
  def stage_keys(self) -> int:
    return self.sub * self.block_k

  @property
  def meta_keys(self) -> int:  # keys of one chunk of the per-key rows
    return self.meta * self.stage_keys

  @property
  def meta_rows(self) -> int:  # key-scale rows a chunk copies: its keys' groups, one more where a chunk
    # may start inside a group (a row past the cache is zero-filled by the TMA and never read)
    aligned = (self.blocks_per_split * self.block_k) % self.group == 0 and self.meta_keys % self.group == 0
    return -(-self.meta_keys // self.group) + (0 if aligned else 1)

  @property
  def p_transposed(self) -> bool:  # N = 8: P is kept as [n_q, bk] (16-byte rows cannot be swizzled)
    return self.n_q == 8

  @property
  def p_tiles(self) -> int:  # P tiles in shared memory: one per block handled at once
    return self.sub if self.pair else 1

  @property
  def p_swizzle(self) -> int:  # the P tile's rows
    return 2 * self.block_k if self.p_transposed else 2 * self.n_q
