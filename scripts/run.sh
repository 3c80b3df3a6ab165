#!/usr/bin/env bash
# Install, then run the whole workflow on the embedded default (ShapesWorld).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
snakemake --cores all "$@"
