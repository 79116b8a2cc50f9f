#!/usr/bin/env bash
# Sets up dtrain from nothing: a virtual environment in .venv with torch, torchvision and
# dtrain itself (editable, with the dev tools, DeepSpeed and Ray Tune). Safe to rerun; it only
# adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
# The torch build is a deliberate choice (docs/index.md, "Choosing torch"); override on a cluster, e.g.
# TORCH_PACKAGES="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124"
torch_packages=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $torch_packages
.venv/bin/python -m pip install -q -e ".[dev,deepspeed,tune,anchor,track]"
