#!/bin/bash
# On the device: gpu tests of the decode kernels, then one ncu report per cache kind (int4, bf16).
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_pallas_decode_quant.py tests/test_pallas_decode.py 2>&1 | tail -3
for kind in int4 bf16; do
  timeout 150 ncu --clock-control none -k regex:decode --launch-count 1 --section SpeedOfLight \
    --section InstructionStats --section LaunchStats --section Occupancy \
    python3 benchmarks/probes/qdecode_probe.py $kind > $OUT/ncu_$kind.txt 2>&1
  grep -E "Duration|Issued Instructions  |Registers Per|Achieved Occ|DRAM Through" $OUT/ncu_$kind.txt
done
