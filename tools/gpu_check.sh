#!/usr/bin/env bash
# One GPU session's checks, under 8 minutes on one H200: the gpu-marked tests and the kernel tests
# (on the CPU those run in triton's interpreter; here on the GPU), then the fused-kernel benchmark
# on Qwen3-32B shapes (dense cuBLAS, unfused chain, split-rank, tiled, dispatching op; two-mode TT/TR/CP/Tucker
# kernel path vs einsum) in fp16, the low-rank table again in bf16, the quantized GEMM against dense. Results land in ${OUT:-gpu-out}/.
# Issue 26's healing measurement is a call of its own: tools/gpu_heal.py (prepare a bundle here, carry it, run it there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# The lent GPU machine's python3 already holds a CUDA torch, triton, transformers and pytest;
# the project runs from the source tree there (PY=... overrides, e.g. PY=.venv/bin/python).
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
rc=0
# the kernel tests run every autotune configuration explicitly: no autotuning per shape they try
for selection in "-m gpu tests" "tests/test_kernels.py tests/test_quant_kernel.py"; do
  # shellcheck disable=SC2086
  TNGRAPH_AUTOTUNE=$([ "$selection" != "-m gpu tests" ] && echo 0 || echo 1) timeout 150 $PY -m pytest -q $selection 2>&1 | tee -a "$OUT/gpu-tests.txt"
  code=${PIPESTATUS[0]}
  [ "$code" -ne 0 ] && [ "$code" -ne 5 ] && rc=$code
done
# each benchmark first checks every kernel against the float32 reference at its shapes (exit 1 if one is off)
timeout 200 $PY tools/bench_kernels.py --dtype fp16 --json "$OUT/bench_kernels_fp16.json" 2>&1 | tee "$OUT/bench_kernels_fp16.txt"
code=${PIPESTATUS[0]}; [ "$code" -ne 0 ] && rc=$code
timeout 90 $PY tools/bench_kernels.py --dtype bf16 --formats --json "$OUT/bench_kernels_bf16.json" 2>&1 | tee "$OUT/bench_kernels_bf16.txt"
code=${PIPESTATUS[0]}; [ "$code" -ne 0 ] && rc=$code
# the quantized layers' GEMM (tngraph/kernels/quant.py) against dense cuBLAS, int8 and int4 g128
timeout 90 $PY tools/bench_quant_kernel.py --dtype fp16 --json "$OUT/bench_quant_kernel.json" 2>&1 | tee "$OUT/bench_quant_kernel.txt"
code=${PIPESTATUS[0]}; [ "$code" -ne 0 ] && rc=$code
# speculative decoding (tngraph.speculative) against greedy generate() is among the gpu-marked tests above
exit "$rc"
