# Sourced by tools/test.sh and tools/demo.sh: create (or reuse) .venv with merge_engine and the
# given extras installed, and activate it. torch is pinned first so pip takes the local CPU build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" numpy "setuptools>=68" wheel ninja
# --no-build-isolation: setup.py builds the C++ kernels against this torch (ninja, 1-2 min). Done again
# only when the packaging changed: edited kernel sources get a development build on first use instead.
stamp="$VENV/.merge_engine-$1.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python -m pip install -q --no-build-isolation -e ".[$1]"
  touch "$stamp"
fi
python -m merge_engine.build_kernels || echo "warning: compiled CPU kernels unavailable; using the references"
