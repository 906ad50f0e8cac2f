# Sourced by the other scripts: create or update a virtualenv for this checkout.
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup_venv() {  # setup_venv VENV EXTRAS TRANSFORMER_LENS_SPEC
    local venv=$1 extras=$2 spec=$3
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    # CPU torch first, so that nothing later pulls a multi-GB CUDA build.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e ".[$extras]" "$spec"
}

TL4_SPEC="transformer-lens>=4.3,<5"
TL3_SPEC="transformer-lens==3.9.0"
