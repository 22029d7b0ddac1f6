#!/usr/bin/env bash
# The prepared device check: everything GPU-only in one call (a lent GPU gives 15 minutes of device time in all,
# the machine's start included). From the repo root, through the device tool:
#
#     run(command="bash bench/gpu_session.sh", timeout_s=560)
#
# The machine has its own CUDA torch, Triton, pybind11, cmake, ninja, pytest-xdist/-timeout and no network, so
# nothing is installed from requirements.txt: `_C` is built in place with CUDA against that Python. Everything
# printed goes to $OUT/gpu_session.log, the benchmarks' CSVs to $OUT/ (at most 8 files come back): commit them
# under bench/results/ with the date and device (the log's first lines). Phases run in order of value, each with
# its own limit, and all within BUDGET seconds, so one hang or slow phase does not cost the ones before it.
set -uo pipefail
OUT=${OUT:-/tmp/zokernels_gpu_session}
BUDGET=${BUDGET:-520}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ZOKERNELS_TEST_GPU=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
START=$(date +%s)
phase() { echo; echo "=== $1 ($(date -u +%H:%M:%S), $(( $(date +%s) - START )) s in)"; }
# limit CAP: the smaller of CAP and the seconds left in the budget (at least 1)
limit() { local left=$(( BUDGET - ($(date +%s) - START) )); (( left < 1 )) && left=1; echo $(( $1 < left ? $1 : left )); }
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs --timeout 120"
{
  phase "device"
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nproc

  phase "build _C with CUDA (sm_80 + sm_90): editable install, else cmake straight into src/"
  if ! ZOKERNELS_FORCE_CUDA=1 timeout "$(limit 150)" python3 -m pip install -q --no-build-isolation --no-deps \
      --no-index -e .; then
    echo "pip build failed: cmake fallback"
    timeout "$(limit 150)" bash -c 'cmake -S . -B /tmp/zk_build -G Ninja -DZOKERNELS_WITH_CUDA=ON \
      -DPython_EXECUTABLE=$(command -v python3) -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) \
      -DZOKERNELS_OUTPUT_DIR=$PWD/src/zokernels && cmake --build /tmp/zk_build --parallel 16'
    export PYTHONPATH=$PWD/src
  fi
  python3 -m zokernels.info

  phase "GPU kernel tests: CUDA kernels, compiled Triton, Philox on cuda, engine GPU path"
  timeout "$(limit 200)" $PYTEST -n 8 --junitxml="$OUT/gpu_tests.xml" \
    tests/test_kernel_matrix.py tests/test_native_boundary.py tests/test_kernels_cuda.py tests/test_kernels_triton.py \
    tests/test_philox_triton.py tests/test_philox_torch.py tests/test_engine_gpu_path.py tests/test_kernels_engine.py \
    tests/test_kernels_sparse.py tests/test_rule_sweep.py tests/test_query_scope.py

  phase "bench: MeZO on the GPU (random-init SmolLM2-135M and Llama-1B shapes, fp32/bf16)"
  timeout "$(limit 120)" python3 bench/mezo_gpu.py --repeats 5 --drift-steps 10 --dtypes bfloat16
  # the torch backend with GPU-sized Philox chunks (kernels/philox_torch.py DEVICE_CHUNK_BLOCKS; was 4.87 s per step)
  timeout "$(limit 60)" python3 bench/mezo_gpu.py --models smollm2-135m --dtypes float32 --backends torch,cuda \
    --repeats 3 --drift-steps 1

  phase "bench: Philox sweeps (cuda, triton) and CGE kernel ops on ResNet-20 shapes"
  timeout "$(limit 60)" python3 bench/philox_sweep.py --repeats 5
  timeout "$(limit 60)" python3 bench/cge_gpu.py --device cuda --batch 256 --skip-step

  phase "the whole suite under the machine's torch and Python (another version than CI's), with the GPU visible"
  timeout "$(limit 150)" $PYTEST -n 12 --maxfail 30 --junitxml="$OUT/suite.xml" tests \
    --ignore=tests/test_install.py

  phase "bench: whole sparse-CGE step on the GPU vs DeepZero block reuse (what time is left)"
  timeout "$(limit 120)" python3 bench/cge_gpu.py --device cuda --batch 256 --engine-sample 8 --baseline-sample 1

  phase "done"
  cp bench/results/mezo_gpu.csv bench/results/philox_sweep.csv bench/results/cge_gpu.csv "$OUT/" 2>/dev/null
  ls -la "$OUT"
} 2>&1 | tee "$OUT/gpu_session.log"
