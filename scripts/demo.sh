#!/usr/bin/env bash
# Set up .venv (TransformerLens 4.x and the embedded Gemma 3 270M, at the versions of
# requirements/tl4.txt) and run the demo.
# Extra arguments go to `tl-powersteer demo`, e.g. `bash scripts/demo.sh --out my-demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

setup_venv .venv gemma requirements/tl4.txt
.venv/bin/tl-powersteer demo "$@"
