#!/bin/bash
# On the device: ncu of one launch of the Hopper vertical-slash kernel at 128K for each given
# "V,S:part" (part: all / no-far / band / far, see kernels.vs_subset): the summary metrics per case, and the
# SASS per instruction as $OUT/sass-<case>.csv (`sass_mix.py` sums it).
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for case in "$@"; do
  set=${case%%:*}; part=${case##*:}; tag=${set/,/-}-$part
  timeout 250 ncu --clock-control none -k regex:lcinfer_flash_mgpu --launch-count 1 --set full \
    --import-source no -o $OUT/rep-$tag python3 benchmarks/probes/vs_one_call.py $set $part > $OUT/ncu_log-$tag.txt 2>&1
  ncu -i $OUT/rep-$tag.ncu-rep > $OUT/ncu_details-$tag.txt 2>&1
  echo "== $case"
  grep -E "^    Duration|Executed Instructions  |Registers Per|Achieved Occ|DRAM Through|L2 Hit Rate  |Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Block Limit Shared|Dynamic Shared" $OUT/ncu_details-$tag.txt
  ncu -i $OUT/rep-$tag.ncu-rep --page source --print-source sass --csv > $OUT/sass-$tag.csv 2>&1
  python3 benchmarks/probes/sass_mix.py $OUT/sass-$tag.csv | head -12
done
