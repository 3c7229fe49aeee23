#!/bin/bash
# On the device: ncu of one launch of a quantized decode kernel at 128K (kind: int4 / int8 / int2 for the
# Triton kernel, mgpu [num_splits=N num_stages=S] for the Mosaic GPU one), by ncu_one.sh: the summary
# metrics, then $OUT/sass-<kind>.csv and its opcode / stall summary.
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
kind=${1:-int4}
regex=$([ "$kind" = mgpu ] && echo qdecode_mgpu || echo quant)
bash benchmarks/probes/ncu_one.sh $kind $regex python3 benchmarks/probes/qdecode_probe.py "$@"
