#!/usr/bin/env bash
# Creates .venv in the project root and installs streamtsm with its test tools.
# torch is pinned to the CPU build so a CPU-only machine never pulls multi-GB CUDA wheels;
# pyproject.toml keeps the range open for users who bring their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests use: mosquitto (the MQTT bridge's tests start a real broker on 127.0.0.1).
APT_PACKAGES="mosquitto"
# Installed only where one is missing and we may (root, apt); elsewhere those tests skip and say why.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s $APT_PACKAGES >/dev/null 2>&1; then
    apt-get update -q -o DPkg::Lock::Timeout=900
    apt-get install -y -q -o DPkg::Lock::Timeout=900 $APT_PACKAGES
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,metrics,triton,mqtt]"
