#!/bin/bash
# On the device: ncu of one launch of the Hopper vertical-slash kernel at 128K for each given
# "V,S:part" (part: all / no-far / band / far, see kernels.vs_subset), by ncu_one.sh.
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for case in "$@"; do
  set=${case%%:*}; part=${case##*:}
  bash benchmarks/probes/ncu_one.sh ${set/,/-}-$part lcinfer_flash_mgpu python3 benchmarks/probes/vs_one_call.py $set $part
done
