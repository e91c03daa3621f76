# Sourced by tools/test.sh and tools/demo.sh: create (or reuse) .venv with merge_engine and the
# given extras installed, and activate it. torch is pinned first so pip takes the local CPU build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" "setuptools>=68" wheel ninja
# --no-build-isolation: setup.py builds the C++ kernels against this torch (ninja, ~1 min)
python -m pip install -q --no-build-isolation -e ".[$1]"
python -m merge_engine.build_kernels || echo "warning: compiled CPU kernels unavailable; using the references"
