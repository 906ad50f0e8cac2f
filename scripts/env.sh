# Sourced by the other scripts: create or update a virtualenv for this checkout.
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Extras of each test environment; the lock files hold exactly what they resolve to.
TL4_EXTRAS=dev,gemma,docs,notebooks
TL3_EXTRAS=dev,gemma
PIP_TOOLS_VERSION=7.6.2

new_venv() {  # new_venv VENV: create it if missing, with the CPU torch build
    [ -x "$1/bin/python" ] || "${PYTHON:-python3}" -m venv "$1"
    # CPU torch first, so that nothing later pulls a multi-GB CUDA build.
    "$1/bin/python" -m pip install -q "torch==2.13.0"
}

setup_venv() {  # setup_venv VENV EXTRAS LOCK: the package, every dependency at its locked version
    new_venv "$1"
    # The lock as constraints: only what EXTRAS need is installed, each at its locked version.
    "$1/bin/python" -m pip install -q -e ".[$2]" -c "$3"
}

setup_latest_venv() {  # setup_latest_venv VENV EXTRAS IN_FILE [SPEC...]: newest the ranges allow
    local venv=$1 extras=$2 ranges=$3
    shift 3
    rm -rf "$venv"
    new_venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade -e ".[$extras]" -r "$ranges"
    # Releases the package's own ranges exclude, tried on purpose (e.g. whether a fix landed).
    if [ $# -gt 0 ]; then "$venv/bin/python" -m pip install -q --upgrade "$@"; fi
    echo "== $venv: $("$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|transformer-lens)==' | tr '\n' ' ')"
}
