#!/usr/bin/env bash
# One device call at the end of a session: the vertical-slash benchmark (H = 32, both Hopper
# layouts), then the Hopper kernel's gpu tests not yet run on this tree, as time allows.
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
timeout 170 python3 benchmarks/kernels.py --only vertical_slash --gqa-kv-heads 32 \
  --vs-variants "ranges mosaic_gpu 56x64,ranges mosaic_gpu 128x128" --reps 5 --out "$out" 2>&1 \
  | grep -E "^\|" | grep -vE "^\|---" | tail -10
timeout 200 python3 -m pytest -q -m gpu tests/test_flash_mgpu.py -k "narrow or running_max or dense" \
  -p timeout --timeout 100 --timeout-method=thread -rf 2>&1 | tail -6 | tee "$out/tests.log"
