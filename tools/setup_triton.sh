#!/usr/bin/env bash
# Creates .venv-triton: the environment of a real Triton Inference Server for the tests and tools/bench_triton.py.
#
# The PyPI wheel nvidia-pytriton ships a real `tritonserver` binary with its python backend (not the onnxruntime
# backend). Its python backend stub loads only under Python 3.11 or 3.13 and needs numpy < 2 in its own
# environment, which is why this is a venv apart from .venv (that one stays on numpy 2). onnxruntime runs the
# exported step inside the python-backend model (`export-triton --runtime python`).
#
# Idempotent: when the venv already answers with the pinned packages it returns at once. Needs only PyPI.
# Set STREAMTSM_TRITON_PYTHON to choose the interpreter (default: python3.11, else python3.13).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton
PYTRITON="nvidia-pytriton==0.7.0"
REQS=("$PYTRITON" "numpy<2" "onnxruntime>=1.17,<1.23")
STAMP="$VENV/.streamtsm-triton-ready"
WANT="${REQS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ] \
        && "$VENV/bin/python" -c "import numpy, onnxruntime, pytriton" 2>/dev/null; then
    exit 0
fi

PY="${STREAMTSM_TRITON_PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python3.11 python3.13; do
        if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
    done
fi
if [ -z "$PY" ]; then
    # Not fatal for the project's own set-up: the real-server tests then skip, saying the environment is absent.
    echo "setup_triton.sh: warning: Triton's python backend needs Python 3.11 or 3.13, neither found" \
         "(set STREAMTSM_TRITON_PYTHON); no .venv-triton, the real-server Triton tests will skip" >&2
    exit 0
fi
version="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$version" in
    3.11|3.13) ;;
    *) echo "setup_triton.sh: $PY is Python $version; Triton's python backend stub loads only under 3.11 or 3.13" >&2
       exit 1 ;;
esac
if [ ! -x "$VENV/bin/python" ] || [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$version" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQS[@]}"
"$VENV/bin/python" - <<'PY'
import pathlib, pytriton
root = pathlib.Path(pytriton.__file__).parent / "tritonserver"
assert (root / "bin" / "tritonserver").is_file(), f"no tritonserver binary under {root}"
assert (root / "backends" / "python").is_dir(), f"no python backend under {root}"
PY
echo "$WANT" > "$STAMP"
