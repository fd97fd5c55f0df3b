#!/usr/bin/env bash
# Run rayflow's main demo job on this machine, after making sure the environment is ready.
#
# Usage: scripts/demo.sh [arguments for `rayflow demo`...]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

./scripts/bootstrap.sh
printf '[demo] running: rayflow demo %s\n' "$*"
exec .venv/bin/rayflow demo "$@"
