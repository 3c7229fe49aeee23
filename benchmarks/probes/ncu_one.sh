#!/bin/bash
# On the device: ncu (--set full) of one launch of the kernels matching REGEX in a python command,
# written under $OUT with TAG: the report's summary metrics on stdout, its details as
# ncu_details-TAG.txt, the SASS per instruction as sass-TAG.csv and its opcode / stall summary.
#   benchmarks/probes/ncu_one.sh TAG REGEX python3 script.py args...
# Used by qdecode_sass.sh and vs_ncu.sh.
tag=$1; regex=$2; shift 2
timeout 250 ncu --clock-control none -k regex:$regex --launch-count 1 --set full --import-source no \
  -o $OUT/rep-$tag "$@" > $OUT/ncu_log-$tag.txt 2>&1
ncu -i $OUT/rep-$tag.ncu-rep > $OUT/ncu_details-$tag.txt 2>&1
echo "== $tag"
grep -E "^    Duration|Executed Instructions  |Registers Per|Achieved Occ|Theoretical Occ|DRAM Through|L2 Hit Rate  |Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Warp Cycles Per Issued|Block Limit|Dynamic Shared" \
  $OUT/ncu_details-$tag.txt
ncu -i $OUT/rep-$tag.ncu-rep --page source --print-source sass --csv > $OUT/sass-$tag.csv 2>&1
python3 benchmarks/probes/sass_mix.py $OUT/sass-$tag.csv 2>&1 | head -40
rm -f $OUT/rep-$tag.ncu-rep   # large; the text files above keep what the notes use
