#!/usr/bin/env bash
# The parity tests against the NEWEST reference releases, in a throwaway environment.
#
#   bash scripts/check_newest_references.sh [FOLDER]      # default: a new temporary folder, removed afterwards
#
# setup.cfg pins the references the suite was written against (transformers 5.24, bitsandbytes 0.50.2, HF peft
# 0.21.2 in tests/test_lora_hf.py). This script builds a separate virtual environment with torch==2.13.0 (the
# project's pin), this project (editable), and the newest transformers, bitsandbytes, HF peft and accelerate the
# package index offers — with whatever they pull in, e.g. Hugging Face's `kernels` package, which transformers
# >= 5.25 imports and our top-level `kernels/` would shadow in the test process. The references run in the
# reference process of tests/reference/isolation.py, so the name clash cannot reach them. It then runs every test
# that compares against a reference, prints the versions and pytest's summary, and exits with pytest's status.
# Nothing in the project's own .venv is touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="${1:-}"
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d -t llama-peft-zoo-newest-XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
VENV="$WORK/venv"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

"$PY" -m venv "$VENV"
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e "$ROOT"
"${PIP[@]}" --upgrade pytest protobuf "hypothesis==6.170.27" transformers bitsandbytes
# HF peft goes into a folder of its own (never into an environment that imports this project's `peft`)
"${PIP[@]}" --target "$WORK/hf-peft" --no-deps --upgrade peft accelerate

"$VENV/bin/python" - "$WORK/hf-peft" <<'EOF'
import importlib.metadata as md, sys
names = ["torch", "transformers", "tokenizers", "bitsandbytes", "kernels", "safetensors"]
versions = {n: (md.version(n) if any(d.metadata["Name"].lower() == n for d in md.distributions()) else "absent")
            for n in names}
peft = [p.name for p in __import__("pathlib").Path(sys.argv[1]).glob("peft-*.dist-info")]
versions["peft (HF, separate folder)"] = peft[0].removeprefix("peft-").removesuffix(".dist-info") if peft else "absent"
print("newest references:", ", ".join(f"{k} {v}" for k, v in versions.items()))
EOF

cd "$ROOT"
export HF_PEFT_DIR="$WORK/hf-peft"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_hf_parity.py tests/test_checkpoint.py tests/test_rope_scaling.py tests/test_llama4.py \
  tests/test_llama4_vision.py tests/test_llama4_preprocess.py tests/test_mllama.py tests/test_mllama_preprocess.py \
  tests/test_model.py tests/test_generate.py \
  tests/test_tokenizer.py tests/test_chat_format.py tests/test_nf4_bnb_parity.py tests/test_lora_hf.py \
  tests/test_bad_inputs.py
