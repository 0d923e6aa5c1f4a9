#!/usr/bin/env bash
# Installs everything into .venv (first run only) and runs the whole test suite (slow/GPU markers deselected).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q "$@"
