#!/usr/bin/env bash
# One device call: the vertical-slash gpu tests of the Hopper kernel (ranges, split mode, columns),
# then where a vertical-slash call's time goes outside the kernel, then the benchmark (H = 32).
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
timeout 270 python3 -m pytest -q -m gpu tests/test_flash_mgpu.py -k "ranges_and_blocks or vertical_slash_with_columns" \
  -p timeout --timeout 120 --timeout-method=thread -rf 2>&1 | tail -6 | tee "$out/tests.log"
timeout 120 python3 benchmarks/probes/vs_prep_probe.py 2>&1 | grep -E "^\||rror" | tail -10
timeout 180 python3 benchmarks/kernels.py --only vertical_slash --gqa-kv-heads 32 \
  --vs-variants "ranges mosaic_gpu 56x64,ranges mosaic_gpu 128x128" --reps 5 --out "$out" 2>&1 \
  | grep -E "^\|" | grep -vE "^\|---" | tail -10
