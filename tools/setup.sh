#!/usr/bin/env bash
# Creates .venv in the project root and installs streamtsm with its test tools.
# torch is pinned to the CPU build so a CPU-only machine never pulls multi-GB CUDA wheels;
# pyproject.toml keeps the range open for users who bring their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, one line: add a package to it, nothing else. Installed only when missing, and only
# as root. chromium: the web view's browser test; xvfb: a virtual X display for the --show test;
# mosquitto: the MQTT bridge's tests start a real broker on 127.0.0.1.
APT_PACKAGES="chromium xvfb mosquitto"

missing=()
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # The lock timeout waits for another apt (an unattended upgrade, a parallel job) instead of failing.
        apt-get update -q -o DPkg::Lock::Timeout=900
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=900 "${missing[@]}"
    else
        echo "setup.sh: not installing Debian packages ${missing[*]} (needs root and apt-get)" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,metrics,triton,mqtt]"
# A real Triton server (nvidia-pytriton) in .venv-triton for tests/test_triton_server.py and tools/bench_triton.py
tools/setup_triton.sh
