#!/usr/bin/env bash
# One device call made of steps, run in the order given (each under its own time limit, so that a
# hang cannot eat the rest; the call's output tail keeps the tables). Usage (the device tool):
#   bash benchmarks/probes/device_call.sh STEP...
# Steps:
#   tests[=EXPR]     gpu tests of the Hopper kernels (flash_mgpu, decode_quant_mgpu), pytest -k EXPR (stops after
#                    2 failures: a hanging kernel costs 120 s per test)
#   dtests[=EXPR]    gpu tests of the decode kernels (bf16, quantized Triton, int4 Hopper), pytest -k EXPR
#   vs[=VARIANTS]    vertical-slash benchmark, H = 32 (default: both Hopper layouts, 56x64 and 128x128)
#   vsgqa[=VARIANTS] the same with the GQA rows (8 KV heads) beside the H = 32 ones (default: the headline, exact
#                    mosaic_gpu 128x64; both: VS_BURST_S=0.5 in the
#                    environment for 0.5 s samples instead of 0.1 s)
#   kernels=SECTIONS benchmarks/kernels.py --only SECTIONS (e.g. dense / block_sparse / copy,decode),
#                    into $OUT/<sections> (rename to kernels-<device>[-sparse|-decode].md)
#   exact[=VARIANTS] gpu tests of the exact mode (tests/test_diagonals.py: the diagonal kernel, the composition
#                    with the Triton and Mosaic GPU block-sparse kernels), then the vertical-slash benchmark of
#                    the exact variants beside their range-only ones (H = 32)
#   diag[=SET]       probes/diag_probe.py (a set's far slashes as exact diagonals under the Triton kernel's
#                    knobs, beside them as ranges on the split-mode Hopper kernel; default set 30,800)
#   vsorder[=VARIANTS] probes/vs_order_probe.py (vertical-slash sets under kernel variants; VARIANTS: the
#                    probe's comma lists joined by '+', e.g. "hf,q56+tf,q56")
#   vsncu=CASES      ncu metrics (time, DRAM bytes, L2 hit rate) of one vertical-slash kernel launch per
#                    CASE "V,S:PART:VARIANT" (probes/vs_one_call.py), CASES joined by '+'. Slow: ~4 min a
#                    case on the H200 (the replays save and restore GBs of inputs)
#   diagncu[=P]      ncu of the (30, 800) far slashes as diagonals (probes/diag_one_call.py; P: persistent
#                    programs): time, DRAM bytes, L2 hit rate, L2 throughput and L1<-L2 bytes as % of peak
#                    (is the far-slash bound the hardware's L2 rate?). ~3-4 min
#   kprof[=CASES]    probes/kprof.py (Mosaic GPU's in-kernel profiler: cycles of each step part of the Hopper
#                    kernel per loop kind; CASES "V,S:PART:VARIANT" or "dense:S" joined by '+'; default
#                    (3500, 100) without far slashes at 56x64, 128x64 and 128x128, (30, 800) without them at
#                    128x64, and dense 16K). ~3-4 min
#   l2[=ARGS]        probes/l2_probe.py (the L2 -> SM read ceiling: Triton and TMA readers of an L2-resident
#                    buffer, 8 and 32 MB, and of a 512 MB one for HBM; ARGS: the probe's flags). ~2 min
#   vstrace[=SETS]   probes/vs_trace_probe.py (per set, the whole call's GPU ops outside the kernel by time;
#                    SETS: "V,S+V,S")
#   vsburst[=SETS]   probes/vs_burst_probe.py (fixed cost per timed sample vs cost per call, vertical-slash
#                    and cuDNN dense, from bursts of 1-8 calls; SETS: "V,S+V,S")
#   vsoverlap[=SETS] probes/vs_trace_probe.py --variant exact[,programs=16|32]: the exact mode's
#                    diagonal and block-sparse kernel windows in one synced call, and how long they overlap
#                    (SETS: "V,S+V,S"; default 1000,6096+3500,100: the two sets 65% efficiency is in reach on)
#   prep             probes/vs_prep_probe.py (builder / kernel inputs / whole call)
#   cta              probes/cta_overhead_probe.py (per-CTA cost outside the steps)
#   qdecode[=OPTS]   probes/qdecode_mgpu_probe.py (int4 Hopper decode: checks, variant times; OPTS: quick,no-check)
#   qparts[=OPTS]    probes/qdecode_parts_probe.py (int4 Hopper decode: whole call, kernels, combination; OPTS: residual)
#   qncu[=VARIANTS]  ncu GPU time of the int4 Hopper decode kernel per variant (probes/qdecode_ncu_variants.py;
#                    VARIANTS: space-separated, e.g. "default num_stages=3 num_splits=64"), bf16 and combination
#                    kernels beside it
#   qbalance[=VARIANTS] ncu per kernel: SM active cycles min/avg/max (the tail), DRAM bytes and throughput
#   trace            probes/decode_trace_probe.py (GPU timeline of the decode executables: kernels, gaps)
#   combine          probes/combine_probe.py (the split-combination kernel per channels per program and warps)
#   qsass[=KNOBS]    ncu of one int4 Hopper decode launch (probes/qdecode_sass.sh mgpu KNOBS, e.g. "narrow=0")
#   htrace           probes/host_trace_probe.py all (host us per call x1/x8, host-plane events, XLA_FLAGS variants)
#   hlen             probes/host_trace_probe.py lengths (wall per call against the burst length, beside the GPU time)
#   hburst           probes/host_trace_probe.py burst (wall vs GPU per call, gaps between back-to-back executions)
#   host             probes/host_dispatch_probe.py (the host's time per execution beside the GPU's: decode
#                    calls, and Mosaic GPU kernels with 2-11 TMA descriptors)
# Example: bash benchmarks/probes/device_call.sh "tests=vertical_slash or ranges" vs prep
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
tables() { grep -E "^\||^fit|rror" | grep -vE "^\|---" | tail -"$1"; }
for step in "$@"; do
  name=${step%%=*}; arg=""; [[ $step == *=* ]] && arg=${step#*=}
  echo "== $step"
  case $name in
    tests) timeout 300 python3 -m pytest -q -m gpu tests/test_flash_mgpu.py tests/test_decode_quant_mgpu.py \
             ${arg:+-k "$arg"} -p timeout --timeout 120 --timeout-method=thread --maxfail=2 -rf 2>&1 | tail -6 \
             | tee -a "$out/tests.log" ;;
    dtests) timeout 300 python3 -m pytest -q -m gpu tests/test_pallas_decode.py tests/test_pallas_decode_quant.py \
              tests/test_decode_quant_mgpu.py ${arg:+-k "$arg"} -p timeout --timeout 120 --timeout-method=thread --maxfail=2 -rf \
              2>&1 | tail -6 | tee -a "$out/tests.log" ;;
    vs) timeout 200 python3 benchmarks/kernels.py --only vertical_slash --gqa-kv-heads 32 --reps 5 --out "$out" \
          --burst-s "${VS_BURST_S:-0.1}" \
          --vs-variants "${arg:-ranges mosaic_gpu 56x64,ranges mosaic_gpu 128x128}" 2>&1 | tables 12 ;;
    exact) timeout 300 python3 -m pytest -q -m gpu tests/test_diagonals.py -p timeout --timeout 120 \
             --timeout-method=thread --maxfail=2 -rf 2>&1 | tail -6 | tee -a "$out/tests.log"
           timeout 420 python3 benchmarks/kernels.py --only vertical_slash --gqa-kv-heads 32 --reps 5 --out "$out" \
             --burst-s "${VS_BURST_S:-0.1}" --vs-variants "${arg:-ranges mosaic_gpu 56x64,exact mosaic_gpu 56x64,\
exact mosaic_gpu desc 128x64,exact mosaic_gpu desc 128x128,ranges mosaic_gpu 128x64,exact mosaic_gpu 128x64,\
exact mosaic_gpu programs=16 128x64,exact mosaic_gpu programs=32 128x64,\
exact mosaic_gpu 128x128}" 2>&1 | tables 40 ;;
    diag) timeout 300 python3 benchmarks/probes/diag_probe.py ${arg:+--set $arg} 2>&1 | grep -E "^diag|rror" \
            | tee -a "$out/diag.log" ;;
    vsgqa) timeout 400 python3 benchmarks/kernels.py --only vertical_slash --gqa-kv-heads 8 --reps 5 --out "$out" \
             --burst-s "${VS_BURST_S:-0.1}" \
             --vs-variants "${arg:-exact mosaic_gpu 128x64}" 2>&1 | tables 14 ;;
    kernels) timeout 330 python3 benchmarks/kernels.py --only "$arg" --reps 5 --out "$out/${arg//,/_}" 2>&1 | tables 40 ;;
    vsorder) v=${arg:-hf,s2,lazy,q56+tf,s2,lazy,q56}
             timeout 500 python3 benchmarks/probes/vs_order_probe.py --check --variants ${v//+/ } 2>&1 \
               | grep -E "^\(v=|^cudnn|rror" | tee -a "$out/vsorder.log" ;;
    vsncu) for c in ${arg//+/ }; do IFS=: read -r set part variant <<< "$c"
             XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 ncu --clock-control none -k regex:lcinfer_flash_mgpu \
               --launch-skip 1 --launch-count 1 --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
lts__t_sector_hit_rate.pct,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_op_read.sum \
               python3 benchmarks/probes/vs_one_call.py "$set" "$part" "$variant" 2>&1 | grep -E '^"[0-9]' \
               | awk -F'","' -v c="$c" '{gsub(/"/,"",$NF); print "vsncu", c, $(NF-2), $NF}' | tee -a "$out/vsncu.log"
           done ;;
    diagncu) XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 ncu --clock-control none -k regex:lcinfer_diagonal \
               --launch-skip 1 --launch-count 1 --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
lts__t_sector_hit_rate.pct,lts__t_sectors_op_read.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
l1tex__m_xbar2l1tex_read_bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
               python3 benchmarks/probes/diag_one_call.py 30,800 $arg 2>&1 | grep -E '^"[0-9]|rror' \
               | awk -F'","' '{gsub(/"/,"",$NF); print "diagncu", $(NF-2), $NF}' | tee -a "$out/diagncu.log" ;;
    kprof) timeout 420 python3 benchmarks/probes/kprof.py ${arg//+/ } 2>&1 | grep -E "^kprof|rror" \
             | tee -a "$out/kprof.log" ;;
    l2) timeout 240 python3 benchmarks/probes/l2_probe.py $arg 2>&1 | grep -E "^l2|rror" | tee -a "$out/l2.log" ;;
    vstrace) timeout 300 python3 benchmarks/probes/vs_trace_probe.py ${arg:+--sets ${arg//+/ }} --out /tmp/trace 2>&1 \
               | grep -E "^vstrace|rror" | tee -a "$out/vstrace.log" ;;
    vsoverlap) sets="${arg:-1000,6096+3500,100}"
               for variant in exact exact,programs=16 exact,programs=32; do
                 timeout 150 python3 benchmarks/probes/vs_trace_probe.py --sets ${sets//+/ } --top 0 \
                   --variant $variant --out /tmp/trace 2>&1 | grep -E "^vstrace|rror" | tee -a "$out/vsoverlap.log"
               done ;;
    vsburst) timeout 300 python3 benchmarks/probes/vs_burst_probe.py ${arg:+--sets ${arg//+/ }} 2>&1 \
               | grep -E "^vsburst|rror" | tee -a "$out/vsburst.log" ;;
    prep) timeout 150 python3 benchmarks/probes/vs_prep_probe.py 2>&1 | tables 12 ;;
    cta) timeout 200 python3 benchmarks/probes/cta_overhead_probe.py 2>&1 | tables 20 ;;
    qdecode) timeout 330 python3 benchmarks/probes/qdecode_mgpu_probe.py ${arg:+--${arg//,/ --}} 2>&1 \
               | grep -E "^check|^int4|^bf16|rror" | tee -a "$out/qdecode.log" | tail -40 ;;
    qparts) timeout 300 python3 benchmarks/probes/qdecode_parts_probe.py ${arg:+--$arg} 2>&1 \
              | grep -E "^parts|^bf16|^residual|rror" \
              | tee -a "$out/qparts.log" ;;
    qncu) timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread \
            -k regex:lcinfer_ --csv \
            python3 benchmarks/probes/qdecode_ncu_variants.py run ${arg:-default} > "$out/qncu.csv" 2> "$out/qncu.err"
          python3 benchmarks/probes/qdecode_ncu_variants.py parse "$out/qncu.csv" ${arg:-default} ;;
    qbalance) timeout 240 ncu --clock-control none --metrics "$(python3 benchmarks/probes/qdecode_ncu_variants.py metrics)" \
                -k regex:lcinfer_ --csv python3 benchmarks/probes/qdecode_ncu_variants.py run ${arg:-default} \
                > "$out/qbalance.csv" 2> "$out/qbalance.err"
              python3 benchmarks/probes/qdecode_ncu_variants.py balance "$out/qbalance.csv" ${arg:-default} ;;
    trace) timeout 240 python3 benchmarks/probes/decode_trace_probe.py --out /tmp/trace 2>&1 \
             | grep -E "^trace|rror" | tee -a "$out/trace.log" ;;
    combine) timeout 200 python3 benchmarks/probes/combine_probe.py 2>&1 | grep -E "^combine|rror" | tee -a "$out/combine.log" ;;
    qsass) timeout 280 bash benchmarks/probes/qdecode_sass.sh mgpu $arg 2>&1 | tail -45 ;;
    host) timeout 240 python3 benchmarks/probes/host_dispatch_probe.py 2>&1 | grep -E "^host|rror" \
            | tee -a "$out/host.log" ;;
    hlen) timeout 400 python3 benchmarks/probes/host_trace_probe.py lengths 2>&1 | grep -E "^host|rror" | tee -a "$out/hlen.log" ;;
    hburst) timeout 500 python3 benchmarks/probes/host_trace_probe.py burst 2>&1 | tee -a "$out/hburst.log" | tail -30 ;;
    htrace) timeout 500 python3 benchmarks/probes/host_trace_probe.py all 2>&1 | tee -a "$out/htrace.log" | tail -60 ;;
    *) echo "unknown step: $step (tests[=EXPR] dtests[=EXPR] vs[=VARIANTS] vsorder[=VARIANTS] vsncu=CASES kprof[=CASES] l2[=ARGS] vstrace[=SETS] kernels=SECTIONS prep cta qdecode qparts qncu qbalance trace combine qsass host htrace hburst hlen)"; exit 2 ;;
  esac
done
