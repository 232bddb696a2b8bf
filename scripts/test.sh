#!/usr/bin/env bash
# The test command (what CI runs): make sure the dependencies are there, then run every test,
# slow ones included. Extra arguments go to pytest (e.g. -m "not slow" for a quick pass).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec python3 -m pytest "$@"
