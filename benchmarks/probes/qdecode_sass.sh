#!/bin/bash
# On the device: per-SASS-instruction counts of the int4 quantized decode kernel (ncu source page).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
timeout 200 ncu --clock-control none -k regex:quant --launch-count 1 --set full --import-source no -o /tmp/rep \
  python3 benchmarks/probes/qdecode_probe.py int4 > $OUT/ncu_log.txt 2>&1
ncu -i /tmp/rep.ncu-rep --page source --print-source sass --csv 2>&1 | gzip > $OUT/sass.csv.gz
ncu -i /tmp/rep.ncu-rep --page details 2>&1 | grep -E "Duration|Issued Instructions  |Registers Per"
