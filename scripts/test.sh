#!/usr/bin/env bash
# Set up both test environments from scratch (or reuse them) and run lint, types and tests:
#   .venv      TransformerLens 4.x (TransformerBridge only)
#   .venv-tl3  TransformerLens 3.9 (HookedTransformer and TransformerBridge)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k power --run-slow`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

setup() {  # setup VENV TRANSFORMER_LENS_SPEC
    local venv=$1 spec=$2
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    # CPU torch first, so that nothing later pulls a multi-GB CUDA build.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e ".[dev]" "$spec"
}

run_tests() {  # run_tests VENV LABEL [pytest args]
    local venv=$1 label=$2
    shift 2
    echo "== pytest, $label"
    "$venv/bin/python" -m pytest -q "$@"
}

setup .venv "transformer-lens>=4.3,<5"
setup .venv-tl3 "transformer-lens==3.9.0"

echo "== ruff"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
echo "== mypy"
.venv/bin/mypy

run_tests .venv "TransformerLens $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')" "$@"
run_tests .venv-tl3 "TransformerLens $(.venv-tl3/bin/python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')" "$@"
