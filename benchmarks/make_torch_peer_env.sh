#!/usr/bin/env bash
# Creates the virtual environment of the PyTorch peer (benchmarks/torchopt_peer.py):
# CPU torch 2.13 and torchopt 0.7.3, kept apart from the project's own environment
# (they are not project dependencies). Usage:
#   bash benchmarks/make_torch_peer_env.sh [VENV_DIR]   (default: .torch-peer-venv)
# then: python -m benchmarks.lm_speed --torch-python VENV_DIR/bin/python
set -euo pipefail
venv="${1:-.torch-peer-venv}"
python3 -m venv "$venv"
# The CPU build is wanted: where a plain `pip install torch` would pull the CUDA
# one, point pip at PyTorch's CPU wheel index first (PIP_EXTRA_INDEX_URL=...).
"$venv/bin/pip" install --quiet "torch==2.13.0" "torchopt==0.7.3" numpy
"$venv/bin/python" -c "import torch, torchopt; print('torch', torch.__version__, 'torchopt', torchopt.__version__)"
