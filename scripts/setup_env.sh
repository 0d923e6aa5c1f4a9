#!/usr/bin/env bash
# Creates .venv beside the repository (once) and installs the project with its test dependencies.
# Sourced by run_main.sh and run_tests.sh; safe to run again (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
# torch is pinned to the CPU wheel (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
"$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
