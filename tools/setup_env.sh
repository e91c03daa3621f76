# Sourced by tools/test.sh and tools/demo.sh: create (or reuse) .venv with merge_engine and the
# given extras installed, and activate it. torch is pinned first so pip takes the local CPU build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$1]"
# the C++ CPU kernels (ninja, ~1 min the first time); without them the PyTorch references run
python -m merge_engine.build_kernels || echo "warning: compiled CPU kernels unavailable; using the references"
