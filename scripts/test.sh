#!/usr/bin/env bash
# Set up both test environments from the lock files (or reuse them) and run lint, types and
# tests:
#   .venv      TransformerLens 4.x (TransformerBridge), requirements/tl4.txt
#   .venv-tl3  TransformerLens 3.9 (HookedTransformer and TransformerBridge), requirements/tl3.txt
# Both run every test, the slow ones on the real Gemma 3 270M included; .venv then executes
# the notebooks (on a tiny model) and builds the documentation site.
# Extra arguments go to pytest in both, e.g. `bash scripts/test.sh -k power`.
#
# The canary, for new upstream releases (not run by CI):
#   bash scripts/test.sh --latest [--with SPEC]... [PYTEST ARGS]
# builds .venv-latest and .venv-latest-tl3 afresh from the newest versions that
# pyproject.toml and requirements/*.in allow, plus each --with SPEC on top (a release the
# ranges exclude, e.g. --with transformers==5.24.0), and runs the same suite in them.
# When it passes, bash scripts/lock.sh records those versions in the lock files.
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

latest=() venv4=.venv venv3=.venv-tl3
if [ "${1:-}" = "--latest" ]; then
    shift
    while [ "${1:-}" = "--with" ]; do
        [ $# -ge 2 ] || { echo "--with needs a requirement, e.g. --with transformers==5.24.0" >&2; exit 2; }
        latest+=("$2")
        shift 2
    done
    venv4=.venv-latest venv3=.venv-latest-tl3
    setup_latest_venv "$venv4" "$TL4_EXTRAS" requirements/tl4.in ${latest[@]+"${latest[@]}"}
    setup_latest_venv "$venv3" "$TL3_EXTRAS" requirements/tl3.in ${latest[@]+"${latest[@]}"}
else
    setup_venv "$venv4" "$TL4_EXTRAS" requirements/tl4.txt
    setup_venv "$venv3" "$TL3_EXTRAS" requirements/tl3.txt
fi

echo "== ruff"
"$venv4/bin/ruff" check tl_powersteer tests benchmarks scripts docs/hooks.py notebooks
"$venv4/bin/ruff" format --check tl_powersteer tests benchmarks scripts docs/hooks.py notebooks
echo "== mypy"
"$venv4/bin/mypy"

versions() {
    "$1/bin/python" -c 'import importlib.metadata as m
print(", ".join(f"{n} {m.version(n)}" for n in ("transformer-lens", "transformers")))'
}
for venv in "$venv4" "$venv3"; do
    echo "== pytest, $(versions "$venv")"
    "$venv/bin/python" -m pytest -q --run-slow "$@"
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "== notebooks, on tiny random copies of the embedded models"
"$venv4/bin/python" scripts/tiny_model.py "$scratch/tiny-gemma"
"$venv4/bin/python" scripts/tiny_model.py "$scratch/tiny-smollm2" smollm2-135m-instruct
TL_POWERSTEER_NOTEBOOK_MODEL="$scratch/tiny-gemma" TL_POWERSTEER_NOTEBOOK_QUICK=1 \
    TL_POWERSTEER_NOTEBOOK_CHAT_MODEL="$scratch/tiny-smollm2" \
    "$venv4/bin/python" -m pytest -q --nbmake notebooks
echo "== docs (warnings are errors)"
NO_MKDOCS_2_WARNING=1 "$venv4/bin/mkdocs" build --strict --quiet --site-dir "$scratch/site"
