"""Analysis (CPU, no GPU needed): the K/V bytes the far slashes of a BENCHMARKS.md vertical-slash set
must bring into the SMs, for a kernel that holds a tile of n query rows and streams the K/V rows
its slashes need, at any n.

A query tile [q0, q0 + n) on slash o needs the key rows [q0 - o, q0 - o + n) (clipped at 0). Rows
that two of the tile's windows share are counted once (the union), so the count already gives a
kernel credit for any reuse between nearby slashes inside a tile. One K row and one V row are 2 x
D x 2 bytes (D = 128, bf16). n = 64 is what the diagonal kernel does; n of a few hundred is what
fits in shared memory beside a tile's Q and accumulators (228 KB an SM on Hopper); the larger n
show how little a bigger tile would save: isolated slashes (50 uniform random offsets over the
sequence) share almost no rows. Printed beside it: the time at a given L2 -> SM rate and the rate
65% efficiency would need for the whole call (BENCHMARKS.md's density 2 (v + s) / S x the cuDNN
dense time / 0.65) if nothing but these reads took time, and the rest of each set (its verticals and
near slashes) at cuDNN dense's time per pair, the floor of the compute beside them.

    PYTHONPATH=. python3 benchmarks/probes/far_slash_bytes.py [--sets 30,800 100,800] [--dense-ms 251.6]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import vs_density, vs_pattern, vs_subset  # noqa: E402

ROW_BYTES = 2 * 128 * 2   # a K row and a V row, D = 128, bf16


def window_union_rows(offsets, s: int, n: int) -> int:
  """Key rows the query tiles [q0, q0 + n) (q0 = 0, n, 2n, ...) of one head need on the slashes
  `offsets` (distinct, in [0, s)): per tile, the union over slashes of [q0 - o, q0 - o + n) clipped
  at 0 and at the tile's last row (a tile past s - 1 rows is cut there), summed over tiles."""
  o = np.sort(np.asarray(offsets, np.int64))[::-1]               # starts q0 - o ascending
  q0 = np.arange(0, s, n, dtype=np.int64)[:, None]
  last = np.minimum(q0 + n, s)                                      # rows [q0, last)
  start = np.maximum(q0 - o[None, :], 0)
  end = np.maximum(last - o[None, :], 0)                            # key i - o for i < last
  # union of intervals with ascending starts and ends: each adds what lies past the previous end
  prev_end = np.concatenate([np.zeros_like(end[:, :1]), np.maximum.accumulate(end, axis=1)[:, :-1]], axis=1)
  return int(np.sum(np.maximum(end - np.maximum(start, prev_end), 0)))


def pair_rows(offsets, s: int) -> int:
  """(row, slash) pairs with a key in [0, s): one K/V row each without any reuse."""
  return int(np.sum(np.maximum(s - np.asarray(offsets, np.int64), 0)))


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--sets", nargs="*", default=["30,800", "100,800", "1000,6096", "3500,100"])
  ap.add_argument("--tiles", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 4096])
  ap.add_argument("--dense-ms", type=float, default=251.6, help="cuDNN dense causal at 128K, H = 32 (session 19)")
  ap.add_argument("--rate", type=float, default=6.7, help="L2 -> SM TB/s for the time column")
  ap.add_argument("--s", type=int, default=131072)
  ap.add_argument("--heads", type=int, default=32)
  a = ap.parse_args(argv)
  s, h = a.s, a.heads
  print(f"far-slash bytes at S = {s}, H = {h}; time at {a.rate} TB/s; dense {a.dense_ms} ms")
  print("| (v, s) | tile rows | GB of K/V rows | / one row a pair | ms at rate | 65% budget ms (whole call) "
        "| TB/s needed if only these reads took time |")
  print("|---|---|---|---|---|---|---|")
  floors = []
  for spec in a.sets:
    nv, ns = map(int, spec.split(","))
    pattern = vs_pattern(np.random.default_rng(0), s, h, nv, ns)
    vert, sl = vs_subset(*pattern, "far")
    budget = 2 * (nv + ns) / s * a.dense_ms / 0.65
    rest_ms = vs_density(*vs_subset(*pattern, "no-far"), s) * a.dense_ms
    floors.append(f"({nv}, {ns}): the rest (verticals and near slashes, exact pairs) at cuDNN dense's rate: "
                  f"{rest_ms:.2f} ms of the {budget:.2f} ms budget")
    pairs = sum(pair_rows(sl[0, i], s) for i in range(h))
    for n in a.tiles:
      rows = sum(window_union_rows(sl[0, i], s, n) for i in range(h))
      gb = rows * ROW_BYTES / 1e9
      print(f"| ({nv}, {ns}) | {n} | {gb:.1f} | {rows / pairs:.3f} | {gb / a.rate:.2f} | {budget:.2f} | "
            f"{gb / budget:.1f} |")
  print("\n".join(floors))
  return 0


if __name__ == "__main__":
  sys.exit(main())
