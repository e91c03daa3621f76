#!/usr/bin/env bash
# Install everything the tests need into .venv (and mergekit 0.1.5 into .venv-mergekit for the parity
# tests, which skip with a reason if that install fails), then run the whole test suite.
# Extra arguments go to pytest.
source "$(dirname "$0")/setup_env.sh" test
if [ "${MERGEKIT:-1}" = 1 ] && [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  echo "installing mergekit 0.1.5 into .venv-mergekit for the parity tests..."
  { python3 -m venv .venv-mergekit &&
    .venv-mergekit/bin/python -m pip install -q "torch==2.13.0" "mergekit==0.1.5"; } ||
    echo "warning: could not install mergekit; the parity tests will be skipped"
fi
export TRITON_INTERPRET=1  # Triton kernels run on the CPU through the interpreter
python -m pytest -q -ra "$@"
