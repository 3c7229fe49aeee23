#!/usr/bin/env bash
# One device call: the Hopper kernels' gpu tests, then the vertical-slash benchmark (the split-mode
# variant only if its tests passed, so a hang cannot eat the baseline). Usage (device tool):
#   bash benchmarks/probes/gpu_session.sh [extra vs variants, comma-separated]
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
timeout 330 python3 -m pytest -q -m gpu tests/test_flash_mgpu.py tests/test_decode_quant_mgpu.py \
  -p timeout --timeout 150 --timeout-method=thread -rf 2>&1 | tee "$out/gpu_tests.log" | tail -25
variants='ranges mosaic_gpu 128x128'
if ! grep -qE "failed|Timeout|error" "$out/gpu_tests.log"; then variants="$variants,ranges mosaic_gpu 56x64${1:+,$1}"; fi
echo "vertical-slash variants: $variants"
timeout 400 python3 benchmarks/kernels.py --only vertical_slash --vs-variants "$variants" --reps 5 --out "$out" \
  2>&1 | tee "$out/vs.log" | grep -E "^\|" | tail -20
