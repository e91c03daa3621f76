#!/usr/bin/env bash
# Install everything the tests need into .venv (and mergekit 0.1.5 into .venv-mergekit for the parity
# tests, which skip with a reason if that install fails), then run the whole test suite. A full run
# (no arguments) also installs the package as users do and uses it from outside the checkout
# (tools/check_install.sh), and tests the CPU kernels' portable lanes. Extra arguments go to pytest.
source "$(dirname "$0")/setup_env.sh" test
if [ "${MERGEKIT:-1}" = 1 ] && [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  echo "installing mergekit 0.1.5 into .venv-mergekit for the parity tests..."
  { python3 -m venv .venv-mergekit &&
    .venv-mergekit/bin/python -m pip install -q "torch==2.13.0" "mergekit==0.1.5"; } ||
    echo "warning: could not install mergekit; the parity tests will be skipped"
fi
ruff check .  # lint: pyflakes, syntax, import order (pyproject.toml [tool.ruff])
if [ $# -eq 0 ]; then
  bash tools/check_install.sh
fi
export TRITON_INTERPRET=1  # Triton kernels run on the CPU through the interpreter
python -m pytest -q -ra "$@"
# a full run also tests the CPU kernels' portable lanes (plain C++, what non-x86 machines build)
if [ $# -eq 0 ] && [ "$(uname -m)" = x86_64 ]; then
  echo "CPU kernels built for x86-64-v2 (no AVX2) against the same references..."
  MERGE_ENGINE_CPU_ARCH=x86-64-v2 python -m pytest -q -ra -m cpu_kernels tests/csrc tests/kernels
fi
