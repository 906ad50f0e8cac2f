#!/usr/bin/env bash
# Set up both test environments (or reuse them) and run lint, types and tests:
#   .venv      TransformerLens 4.x (TransformerBridge)
#   .venv-tl3  TransformerLens 3.9 (HookedTransformer and TransformerBridge)
# Both run every test, the slow ones on the real Gemma 3 270M included; .venv then executes
# the notebooks (on a tiny model) and builds the documentation site.
# Extra arguments go to pytest in both, e.g. `bash scripts/test.sh -k power`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The atlas page is tested in Debian's Chromium (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing chromium for the browser test"
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    else
        echo "chromium is missing, so the browser test is skipped: apt-get install chromium"
    fi
fi

setup_venv .venv dev,gemma,docs "$TL4_SPEC"
setup_venv .venv-tl3 dev,gemma "$TL3_SPEC"

echo "== ruff"
.venv/bin/ruff check src tests benchmarks scripts docs/hooks.py notebooks
.venv/bin/ruff format --check src tests benchmarks scripts docs/hooks.py notebooks
echo "== mypy"
.venv/bin/mypy

version() { "$1/bin/python" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'; }
for venv in .venv .venv-tl3; do
    echo "== pytest, TransformerLens $(version $venv)"
    "$venv/bin/python" -m pytest -q --run-slow "$@"
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "== notebooks, on a tiny random Gemma 3"
.venv/bin/python scripts/tiny_model.py "$scratch/tiny-gemma"
TL_POWERSTEER_NOTEBOOK_MODEL="$scratch/tiny-gemma" .venv/bin/python -m pytest -q --nbmake notebooks
echo "== docs (warnings are errors)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$scratch/site"
