#!/usr/bin/env bash
# Creates .venv in the project root and installs streamtsm with its test tools.
# torch is pinned to the CPU build so a CPU-only machine never pulls multi-GB CUDA wheels;
# pyproject.toml keeps the range open for users who bring their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests use: xvfb (a virtual X display for the --show test). Installed when missing and root.
APT_PACKAGES="xvfb"
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q -o DPkg::Lock::Timeout=900 $missing
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,metrics,triton]"
