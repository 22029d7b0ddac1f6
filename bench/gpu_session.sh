#!/usr/bin/env bash
# The prepared device check: everything GPU-only in one call, for the first session that is lent a GPU (15 minutes
# of device time in all; this script is sized for ~9). From the repo root, through the device tool:
#
#     run(command="bash bench/gpu_session.sh", timeout_s=570)
#
# The machine has its own CUDA torch, Triton, pybind11, cmake and ninja and no network, so nothing is installed
# from requirements.txt: `_C` is built in place with CUDA against that torch. Everything printed goes to
# $OUT/gpu_session.log, the benchmarks' CSV rows to $OUT/*.csv: commit them under bench/results/ with the date and
# device (the log's first lines). Each phase has its own time limit, so one hang does not cost the others.
set -uo pipefail
OUT=${OUT:-/tmp/zokernels_gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ZOKERNELS_TEST_GPU=1 TRITON_INTERPRET=0
phase() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
{
  phase "device"
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

  phase "build _C with CUDA (sm_90)"
  ZOKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    timeout 240 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . || echo "BUILD FAILED"
  python3 -m zokernels.info

  phase "GPU and Triton tests (real compiler)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -x -rs \
    tests/test_kernels_cuda.py tests/test_kernels_triton.py tests/test_philox_triton.py \
    tests/test_engine_gpu_path.py tests/test_kernels_engine.py tests/test_kernels_sparse.py

  phase "engine under the machine's torch (another version than CI's): corpus cases vs the float64 oracle"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -x tests/test_foreign_models.py -k "resnet20 or vit_sdpa or hf_bert"

  phase "benchmarks"
  timeout 60 python3 bench/philox_sweep.py --repeats 5
  timeout 120 python3 bench/cge_gpu.py --device cuda --batch 256 --engine-sample 16 --baseline-sample 2
  cp bench/results/philox_sweep.csv bench/results/cge_gpu.csv "$OUT/" 2>/dev/null  # at most 8 files come back
  phase "done"
} 2>&1 | tee "$OUT/gpu_session.log"
