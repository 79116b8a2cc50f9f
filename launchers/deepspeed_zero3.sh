#!/bin/bash
# DeepSpeed ZeRO-3 on one node with the deepspeed launcher (add --hostfile for several nodes).
#   bash launchers/deepspeed_zero3.sh [dtrain train arguments...]
set -euo pipefail
deepspeed --num_gpus "${NUM_GPUS:-8}" --module dtrain train \
  train.deepspeed=configs/deepspeed/zero3.json "$@"
