#!/bin/bash
# On the device: ncu of one launch of the Mosaic GPU int4 decode kernel (128K): summary sections, then
# the SASS per instruction (counts, stalls) as csv under $OUT.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
timeout 300 ncu --clock-control none -k regex:qdecode_mgpu --launch-count 1 --set full --import-source no \
  -o $OUT/mgpu python3 benchmarks/probes/qdecode_probe.py mgpu "$@" > $OUT/ncu_log.txt 2>&1
ncu -i $OUT/mgpu.ncu-rep > $OUT/ncu_mgpu.txt 2>&1
grep -E "Duration|Executed Instructions  |Registers Per|Achieved Occ|Theoretical Occ|DRAM Through|Block Limit|Shared Memory Config|Dynamic Shared|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" $OUT/ncu_mgpu.txt
ncu -i $OUT/mgpu.ncu-rep --page source --print-source sass --csv > $OUT/sass.csv 2>&1
wc -l $OUT/sass.csv
