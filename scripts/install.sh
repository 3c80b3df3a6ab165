#!/usr/bin/env bash
# Install diffatlas into .venv: torch pinned first (CPU wheel; a looser torch pulls a
# multi-GB CUDA build), then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,slurm]"
