#!/usr/bin/env bash
# One device call: the per-CTA overhead probe, then the dense, block-sparse and decode sections of
# benchmarks/kernels.py, each into its own folder of $OUT (rename to kernels-<device>{,-sparse,-decode}.md).
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
timeout 200 python3 benchmarks/probes/cta_overhead_probe.py --reps 5 "$@" 2>&1 | grep -E "^\||^fit|rror" | tail -40
for sec in dense:dense block_sparse:sparse copy,decode:decode; do
  echo "== ${sec%%:*}"
  timeout 240 python3 benchmarks/kernels.py --only "${sec%%:*}" --reps 5 --out "$out/${sec##*:}" 2>&1 \
    | grep -E "^\|" | grep -vE "^\|---|^\| impl" | tail -40
done
