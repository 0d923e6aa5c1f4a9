#!/usr/bin/env bash
# The README's first command: set up .venv (first run only), then run the main job, the PEFT ablation, with its
# defaults. Extra arguments go to scripts/ablate_peft.py (e.g. --max-steps 3 for a smoke test).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python scripts/ablate_peft.py "$@"
