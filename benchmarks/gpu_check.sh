#!/usr/bin/env bash
# On an H100/H200 machine: the fused mixup kernel tests (tests/test_kernels.py) compiled for the
# GPU, then the benchmark. Needs torch, triton, timm and pytest (a GPU machine's python3 has
# them; dtrain need not be installed); under 5 minutes.
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/mixup_<gpu>.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# tests/conftest.py turns Triton's interpreter on unless told otherwise: here the kernels must be
# compiled for the GPU. The CPU (interpreted) cases are then skipped, and DTRAIN_TEST_DEVICE=cuda
# makes the CUDA cases fail, not skip, when no GPU is usable, so the check cannot pass on skips.
export TRITON_INTERPRET=0
export DTRAIN_TEST_DEVICE=cuda
python3 -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.cuda.get_device_name(0))'
python3 -m pytest -q tests/test_kernels.py
python3 benchmarks/mixup_bench.py --repeats 20
