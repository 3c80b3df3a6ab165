#!/usr/bin/env bash
# Install, then run the test suite (the README's test command; .ci/run calls exactly this):
# pytest, then the real SLURM test (scripts/slurm_test.sh), which brings up a private
# single-node SLURM cluster and so needs root (CI runs as root). Elsewhere set
# DIFFATLAS_SLURM_TEST=0 to leave it out, or run it alone with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
# The atlas's browser test drives Debian's headless chromium through its chromedriver (under
# CI=true a missing browser fails that test). Installed only when missing, and only as root.
if ! { command -v chromium >/dev/null && [ -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# --durations: every slow test's time is in the CI log, so the 20-minute budget stays visible.
.venv/bin/python -m pytest -q --durations=25 "$@"
if [ "${DIFFATLAS_SLURM_TEST:-1}" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        timeout -k 30 1200 bash scripts/slurm_test.sh
    else
        echo "scripts/test.sh: the SLURM test needs root (it installs and starts SLURM); run: sudo bash scripts/slurm_test.sh" >&2
        exit 1
    fi
fi
