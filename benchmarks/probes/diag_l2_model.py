"""Model (CPU, no GPU needed): which share of the diagonal kernel's K/V row reads miss L2, by offset order.

The far slashes of a BENCHMARKS.md set as `diagonals.diagonal_attention` runs them on one head: query
blocks of 64 rows launched in order with W programs in flight (each one step of `per_step` diagonals
a time unit, a finished block's slot taken by the next block), each step reading the rows i - o of its
diagonals; an LRU cache of L2_MB over 512-byte rows (a K row and a V row). A key row is used by 50
blocks spread over the whole sequence, and one head's K/V (64 MB at 128K) is more than the H200's L2
(50 MB, in two halves), so whether reuse hits depends on when the blocks that share a row run:
ascending offsets (the default) make the newest blocks read the nearest diagonals and the oldest the
farthest, descending offsets make blocks started at different times read nearer rows at once.
Crude (no timing of misses, no L2 partitions or sectors, one head); it ranks orders, it does not
predict milliseconds. The same kind of model was wrong once (NOTES, session 17: it predicted the
Hopper kernel's tiles-first order would win, and that order lost on every set), so the diag probe's
descending rows decide.

    PYTHONPATH=. python3 benchmarks/probes/diag_l2_model.py [--set 30,800] [--programs 264 528] [--l2-mb 25 40]
"""
from __future__ import annotations

import argparse
import heapq
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from far_slash_bytes import ROW_BYTES  # noqa: E402  (a K row and a V row)
from kernels import vs_pattern, vs_subset  # noqa: E402


def l2_misses(offsets, s: int, programs: int, l2_rows: int, descending: bool, block_q: int = 64,
              per_step: int = 2) -> tuple[int, int]:
  """(row reads, misses) of one head's diagonals under the model (module docstring)."""
  offsets = np.sort(offsets[(offsets > 0) & (offsets < s)])
  nq = -(-s // block_q)
  lru: OrderedDict = OrderedDict()
  reads = misses = 0
  heap: list = []
  nxt = 0

  def block_offsets(j):
    o = offsets[offsets <= j * block_q + block_q - 1]   # the kernel's count: offsets up to the last row
    return o[::-1] if descending else o

  def start(t):
    nonlocal nxt
    while nxt < nq and not len(block_offsets(nxt)):
      nxt += 1
    if nxt < nq:
      heapq.heappush(heap, (t, nxt, 0))
      nxt += 1
  for _ in range(programs):
    start(0)
  while heap:
    t, j, k = heapq.heappop(heap)
    o = block_offsets(j)
    for off in o[k:k + per_step]:
      rows = np.arange(j * block_q, min(j * block_q + block_q, s)) - off
      for r in rows[rows >= 0].tolist():
        reads += 1
        if r in lru:
          lru.move_to_end(r)
        else:
          misses += 1
          lru[r] = None
          if len(lru) > l2_rows:
            lru.popitem(last=False)
    if k + per_step < len(o):
      heapq.heappush(heap, (t + 1, j, k + per_step))
    else:
      start(t + 1)
  return reads, misses


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--set", default="30,800")
  ap.add_argument("--seq", type=int, default=131072)
  ap.add_argument("--programs", type=int, nargs="*", default=[264, 528])
  ap.add_argument("--l2-mb", type=int, nargs="*", default=[25, 40])
  a = ap.parse_args(argv)
  nv, ns = map(int, a.set.split(","))
  _, sl = vs_subset(*vs_pattern(np.random.default_rng(0), a.seq, 1, nv, ns), "far")
  print("| programs in flight | L2 MB | order | row reads | L2 misses |\n|---|---|---|---|---|")
  for w in a.programs:
    for mb in a.l2_mb:
      for desc in (False, True):
        reads, misses = l2_misses(sl[0, 0], a.seq, w, mb * 2 ** 20 // ROW_BYTES, desc)
        print(f"| {w} | {mb} | {'descending' if desc else 'ascending'} | {reads} | {misses / reads:.3f} |",
              flush=True)


if __name__ == "__main__":
  main()
