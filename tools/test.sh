#!/usr/bin/env bash
# Install everything the tests need into .venv (and mergekit 0.1.5 into .venv-mergekit for the parity
# tests, which skip with a reason if that install fails), then run the whole test suite. A full run
# (no arguments) also installs the package as users do and uses it from outside the checkout
# (tools/check_install.sh), and tests the CPU kernels' portable lanes. Extra arguments go to pytest.
#
# Independent steps overlap, since most of them keep one core busy (a pip install, one compiler, one test
# process): mergekit installs while .venv is set up; the install check and the portable lanes' kernel build
# run while the suite runs; the suite runs on one pytest-xdist worker per core (PYTEST_WORKERS overrides).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d "${TMPDIR:-/tmp}/merge_engine_test_logs.XXXXXX")
trap 'rm -rf "$logs"' EXIT
full=$([ $# -eq 0 ] && echo 1 || echo 0)
portable=$([ "$full" = 1 ] && [ "$(uname -m)" = x86_64 ] && echo 1 || echo 0)

if [ "${MERGEKIT:-1}" = 1 ] && [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  echo "installing mergekit 0.1.5 into .venv-mergekit for the parity tests (in the background)..."
  { python3 -m venv .venv-mergekit &&
    .venv-mergekit/bin/python -m pip install -q "torch==2.13.0" "mergekit==0.1.5"; } \
    > "$logs/mergekit.log" 2>&1 &
  mergekit_pid=$!
fi
source tools/setup_env.sh test || exit 1
set -e
ruff check .  # lint: pyflakes, syntax, import order (pyproject.toml [tool.ruff])

if [ "$full" = 1 ]; then
  bash tools/check_install.sh > "$logs/install.log" 2>&1 &
  install_pid=$!
fi
if [ "$portable" = 1 ]; then  # the portable lanes' build, for the rerun at the end
  MERGE_ENGINE_CPU_ARCH=x86-64-v2 python -m merge_engine.build_kernels > "$logs/portable.log" 2>&1 &
  portable_pid=$!
fi
if [ -n "${mergekit_pid:-}" ] && ! wait "$mergekit_pid"; then
  tail -5 "$logs/mergekit.log"
  echo "warning: could not install mergekit; the parity tests will be skipped"
fi

export TRITON_INTERPRET=1  # Triton kernels run on the CPU through the interpreter
workers=(-n "${PYTEST_WORKERS:-auto}" --dist worksteal)  # idle workers take tests queued for busy ones
status=0
python -m pytest -q -ra "${workers[@]}" "$@" || status=$?

if [ "$full" = 1 ]; then
  echo "install check (tools/check_install.sh, run alongside the suite):"
  wait "$install_pid" && cat "$logs/install.log" || { cat "$logs/install.log"; status=1; }
fi
# a full run also tests the CPU kernels' portable lanes (plain C++, what non-x86 machines build)
if [ "$portable" = 1 ]; then
  wait "$portable_pid" || { cat "$logs/portable.log"; status=1; }
  echo "CPU kernels built for x86-64-v2 (no AVX2) against the same references..."
  MERGE_ENGINE_CPU_ARCH=x86-64-v2 python -m pytest -q -ra "${workers[@]}" -m cpu_kernels tests/csrc tests/kernels ||
    status=$?
fi
exit "$status"
