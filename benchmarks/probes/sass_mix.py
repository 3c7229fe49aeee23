"""Sum an ncu SASS source page (csv from `ncu_one.sh`) by opcode: executed warp instructions and
warp-stall samples, the most frequent first; then the stall reasons with their top opcodes.
    python3 benchmarks/probes/sass_mix.py $OUT/sass-<tag>.csv"""
import collections
import csv
import re
import sys


def opcode(src: str) -> str:
  src = re.sub(r"^@!?U?P\w+\s+", "", src.strip())  # drop a predicate guard
  return src.split()[0].split(".")[0] if src else "?"


def main(path: str) -> None:
  rows = list(csv.reader(open(path)))
  hdr, data = rows[1], rows[2:]
  i_src, i_exe = hdr.index("Source"), hdr.index("Instructions Executed")
  i_all = hdr.index("Warp Stall Sampling (All Samples)")
  reasons = [(h, hdr.index(h)) for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
  num = lambda x: int(x.replace(",", "") or 0)  # noqa: E731
  count, stall = collections.Counter(), collections.Counter()
  by_reason = collections.defaultdict(collections.Counter)
  for r in data:
    if not r[i_exe]:
      continue
    op = opcode(r[i_src])
    count[op] += num(r[i_exe])
    stall[op] += num(r[i_all])
    for name, i in reasons:
      by_reason[name][op] += num(r[i])
  total, samples = sum(count.values()), max(sum(stall.values()), 1)
  print(f"{total:,} warp instructions, {samples:,} stall samples")
  for op, n in count.most_common(30):
    print(f"{op:12s} {n:>12,d} {n / total:6.1%}  stalls {stall[op] / samples:6.1%}")
  all_reasons = {name: sum(c.values()) for name, c in by_reason.items()}
  for name, n in sorted(all_reasons.items(), key=lambda kv: -kv[1])[:8]:
    print(f"{name:24s} {n / samples:6.1%}  {by_reason[name].most_common(4)}")


if __name__ == "__main__":
  main(sys.argv[1])
