#!/usr/bin/env bash
# Creates .venv in the project root and installs streamtsm with its test tools.
# torch is pinned to the CPU build so a CPU-only machine never pulls multi-GB CUDA wheels;
# pyproject.toml keeps the range open for users who bring their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,metrics,triton]"
# A real Triton server (nvidia-pytriton) in .venv-triton for tests/test_triton_server.py and tools/bench_triton.py
tools/setup_triton.sh
