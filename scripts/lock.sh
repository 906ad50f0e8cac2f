#!/usr/bin/env bash
# Regenerate the lock files requirements/tl4.txt and requirements/tl3.txt from pyproject.toml
# and requirements/*.in, with pip-tools (pip's own resolver, which sees the CPU torch build
# that `pip install torch==2.13.0` takes). Run it after the canary passes:
#   bash scripts/test.sh --latest && bash scripts/lock.sh && bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

venv=.venv-lock
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q "pip-tools==$PIP_TOOLS_VERSION"

lock() {  # lock NAME EXTRAS
    local name=$1 extras=$2
    local args=(--quiet --upgrade --strip-extras --no-emit-index-url --no-emit-find-links
        --output-file "requirements/$name.txt")
    for extra in ${extras//,/ }; do args+=(--extra "$extra"); done
    echo "== requirements/$name.txt"
    CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" \
        "$venv/bin/pip-compile" "${args[@]}" pyproject.toml "requirements/$name.in"
    # The CPU build's local label (+cpu) names no release on PyPI; the version alone
    # selects the same file here and keeps the lock usable where the index serves torch.
    sed -i -E 's/^(torch==[0-9.]+)\+cpu$/\1/' "requirements/$name.txt"
}

lock tl4 "$TL4_EXTRAS"
lock tl3 "$TL3_EXTRAS"
