export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_flash_mgpu.py tests/test_pallas_decode_quant.py -x 2>&1 | tail -4
python3 benchmarks/kernels.py --only vertical_slash --reps 5 --out $OUT/s 2>&1 | grep -E "^\| \(|error" | head -60
