#!/bin/bash
# Probe run on the device: gpu tests of the quantized kernel, timings, one ncu report (int4).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_pallas_decode_quant.py 2>&1 | tail -3
python3 benchmarks/probes/qdecode_probe.py 2>&1 | grep -v "^W0\|^I0" | tee $OUT/time.txt
timeout 150 ncu --clock-control none -k regex:quant --launch-count 1 --section SpeedOfLight --section InstructionStats --section LaunchStats --section Occupancy \
  python3 benchmarks/probes/qdecode_probe.py --one int4 > $OUT/ncu_int4.txt 2>&1
grep -E "Duration|Issued Instructions  |Registers Per|No Eligible|Theoretical Occ|Achieved Occ|DRAM Through" $OUT/ncu_int4.txt
