#!/usr/bin/env bash
# One device call: the persistent kernel's gpu tests; if they pass, the per-CTA probe persistent on /
# off, the vertical-slash time outside the kernel, and the vertical-slash benchmark with and without
# persistence (H = 32 only).
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
timeout 200 python3 -m pytest -q -m gpu tests/test_flash_mgpu.py -k "persistent" \
  -p timeout --timeout 150 --timeout-method=thread -rf 2>&1 | tail -6 | tee "$out/persistent_tests.log"
if grep -qE "failed|Timeout|error" "$out/persistent_tests.log"; then p=""; else p="on"; fi
timeout 120 python3 benchmarks/probes/cta_overhead_probe.py --modes 56x64 128x128 --counts 0 4 16 --persistent off $p 2>&1 | grep -E "^\||^fit|rror" | tail -20
timeout 150 python3 benchmarks/probes/vs_prep_probe.py --blocks 56x64 ${p:+--persistent} 2>&1 | grep -E "^\||rror" | tail -8
v="ranges mosaic_gpu 56x64"; [ -n "$p" ] && v="$v,ranges mosaic_gpu persistent 56x64,ranges mosaic_gpu persistent 128x128"
timeout 240 python3 benchmarks/kernels.py --only vertical_slash --gqa-kv-heads 32 --vs-variants "$v" --reps 5 --out "$out" 2>&1 \
  | grep -E "^\|" | grep -vE "^\|---" | tail -16
