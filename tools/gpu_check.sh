#!/usr/bin/env bash
# One GPU session's checks, under 8 minutes on one H200: the gpu-marked tests, then the kernel
# benchmarks on Qwen3-32B shapes. Results land in ${OUT:-gpu-out}/.
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
timeout 240 $PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 5 ] && rc=0
for dtype in fp16 bf16; do
  timeout 120 $PY tools/bench_lowrank.py --device cuda --dtype $dtype --json "$OUT/bench_lowrank_$dtype.json" 2>&1 | tee "$OUT/bench_lowrank_$dtype.txt"
done
exit "$rc"
