"""Analysis (CPU, no GPU needed): the K/V bytes the far slashes of a BENCHMARKS.md vertical-slash set
must bring into the SMs, for a kernel that holds a tile of n query rows and streams the K/V rows
its slashes need, at any n.

A query tile [q0, q0 + n) on slash o needs the key rows [q0 - o, q0 - o + n) (clipped at 0). Rows
that two of the tile's windows share are counted once (the union), so the count already gives a
kernel credit for any reuse between nearby slashes inside a tile. One K row and one V row are 2 x
D x 2 bytes (D = 128, bf16). n = 64 is what the diagonal kernel does; n of a few hundred is what
fits in shared memory beside a tile's Q and accumulators (228 KB an SM on Hopper); larger n need a
cluster of CTAs sharing their loads (TMA multicast): 8 CTAs is the portable maximum, 16 Hopper's
non-portable one. 50 uniform random offsets are ~2,600 apart, so windows of a few hundred rows
share almost nothing, and only n in the thousands saves much (~30% at 2048, ~48% at 4096).

Two tables. Per tile height: the bytes, their time at the L2 -> SM rate and the rate 65% efficiency
would need for the whole call (BENCHMARKS.md's density 2 (v + s) / S x the cuDNN dense time / 0.65)
if nothing but these reads took time. Per design (DESIGNS): with the rest of each set (verticals
and near slashes) at cuDNN dense's time per pair, or at the tensor peak, the best efficiency if the
far slashes run before or after the rest at the L2 ceiling, and the shares of the L2 ceiling and of
cuDNN's rate a kernel overlapping the two perfectly must hold together for the whole call.

    PYTHONPATH=. python3 benchmarks/probes/far_slash_bytes.py [--sets 30,800 100,800] [--out F.md]
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


# designs for the whole-call table: query rows one kernel shares its far-slash loads over
DESIGNS = ((64, "the diagonal kernel's block (exact mode)"), (256, "one CTA's tile beside the band pipeline"),
           (2048, "8-CTA cluster (portable maximum), loads shared by TMA multicast"),
           (4096, "16-CTA cluster (Hopper's non-portable maximum)"))


def whole_call_bound(far_gb: float, rest_ms: float, budget_ms: float, l2_tbs: float, rest_scale: float = 1.0):
  """What 65% of the whole call asks of a kernel whose far slashes read `far_gb` from L2 at the
  ceiling `l2_tbs` while the rest takes `rest_ms` x `rest_scale` of tensor time (`budget_ms`: the
  whole call's time at 65%). Returns the far slashes' ms at the ceiling; the best efficiency if the
  two run one after the other (0.65 x budget / their sum); and, if they overlap perfectly, the shares
  of the L2 ceiling and of that tensor rate that both must hold for the whole call."""
  far_ms = far_gb / l2_tbs                    # GB / (TB/s) = ms
  rest = rest_ms * rest_scale
  return {"far_ms": far_ms, "serial_eff": 0.65 * budget_ms / (far_ms + rest),
          "l2_frac": far_ms / budget_ms, "tensor_frac": rest / budget_ms}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--sets", nargs="*", default=["30,800", "100,800", "1000,6096", "3500,100"])
  ap.add_argument("--tiles", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 4096])
  ap.add_argument("--dense-ms", type=float, default=254.84,
                  help="cuDNN dense causal at 128K, H = 32 (H200, session 23, kernels-nvidia-h200-vs-exact.md)")
  ap.add_argument("--rate", type=float, default=9.9,
                  help="L2 -> SM TB/s: the H200's measured read ceiling (l2-nvidia-h200.md)")
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 tensor peak (H100/H200 SXM)")
  ap.add_argument("--s", type=int, default=131072)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--out", help="also write both tables as markdown to this file")
  a = ap.parse_args(argv)
  s, h = a.s, a.heads
  dense_tflops = 4 * s * (s + 1) / 2 * 128 * h / (a.dense_ms * 1e-3) / 1e12
  tiles = ["| (v, s) | tile rows | GB of K/V rows | / one row a pair | ms at rate | 65% budget ms (whole call) "
           "| TB/s needed if only these reads took time |", "|---|---|---|---|---|---|---|"]
  whole = ["| (v, s) | shared over query rows | far-slash GB | far ms at the ceiling | rest ms at cuDNN's rate "
           "| best efficiency, one after the other (cuDNN's rate / tensor peak) "
           "| overlapped: L2 ceiling share + cuDNN-rate share, both for the whole call |",
           "|---|---|---|---|---|---|---|"]
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
    rows_at = {n: sum(window_union_rows(sl[0, i], s, n) for i in range(h))
               for n in sorted(set(a.tiles) | {d for d, _ in DESIGNS})}
    gb_at = {n: rows * ROW_BYTES / 1e9 for n, rows in rows_at.items()}
    for n in a.tiles:
      gb = gb_at[n]
      tiles.append(f"| ({nv}, {ns}) | {n} | {gb:.1f} | {rows_at[n] / pairs:.3f} | {gb / a.rate:.2f} | "
                   f"{budget:.2f} | {gb / budget:.1f} |")
    for n, what in DESIGNS:
      cud = whole_call_bound(gb_at[n], rest_ms, budget, a.rate)
      peak = whole_call_bound(gb_at[n], rest_ms, budget, a.rate, dense_tflops / a.peak_tflops)
      whole.append(f"| ({nv}, {ns}) | {n}: {what} | {gb_at[n]:.1f} | {cud['far_ms']:.2f} | {rest_ms:.2f} | "
                   f"{cud['serial_eff']:.2f} / {peak['serial_eff']:.2f} | "
                   f"{cud['l2_frac']:.0%} + {cud['tensor_frac']:.0%} |")
  head = (f"far-slash bytes at S = {s}, H = {h}; L2 ceiling {a.rate} TB/s; cuDNN dense {a.dense_ms} ms "
          f"({dense_tflops:.0f} TFLOP/s, {dense_tflops / a.peak_tflops:.0%} of a {a.peak_tflops:.0f} peak)")
  text = "\n".join([head, "", *tiles, "", *floors, "", *whole])
  print(text)
  if a.out:
    cmd = " ".join(["PYTHONPATH=. python3 benchmarks/probes/far_slash_bytes.py", *(argv or sys.argv[1:])])
    Path(a.out).write_text(f"# What 65% efficiency on the vertical-slash sets asks of the L2 (analysis, CPU)\n\n"
                           f"- command: `{cmd}`\n- inputs: the L2 read ceiling and cuDNN dense time measured "
                           f"on the H200 (`l2-nvidia-h200.md`, `kernels-nvidia-h200-vs-exact.md`)\n\n{text}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
