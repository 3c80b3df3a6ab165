#!/usr/bin/env bash
# Install, then run the test suite (the README's test command; .ci/run calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest -q "$@"
