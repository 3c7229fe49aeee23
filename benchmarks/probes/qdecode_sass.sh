#!/bin/bash
# On the device: ncu of one launch of a quantized decode kernel at 128K (kind: int4 / int8 / int2 for the
# Triton kernel, mgpu [num_splits=N num_stages=S] for the Mosaic GPU one): the summary metrics, then the
# SASS per instruction (counts, stall samples) as csv under $OUT; `sass_mix.py $OUT/sass.csv` sums it.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
kind=${1:-int4}
regex=$([ "$kind" = mgpu ] && echo qdecode_mgpu || echo quant)
timeout 300 ncu --clock-control none -k regex:$regex --launch-count 1 --set full --import-source no \
  -o $OUT/rep python3 benchmarks/probes/qdecode_probe.py "$@" > $OUT/ncu_log.txt 2>&1
ncu -i $OUT/rep.ncu-rep > $OUT/ncu_details.txt 2>&1
grep -E "Duration|Executed Instructions  |Registers Per|Achieved Occ|Theoretical Occ|DRAM Through|Block Limit|Dynamic Shared|Issue Slots Busy|Warp Cycles Per Issued" $OUT/ncu_details.txt
ncu -i $OUT/rep.ncu-rep --page source --print-source sass --csv > $OUT/sass.csv 2>&1
