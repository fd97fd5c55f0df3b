#!/usr/bin/env bash
# Run rayflow's main demo job on this machine, after making sure the environment is ready.
#
# The demo runs its agents in Docker sandboxes when it can: this script installs and starts a
# Docker engine if none is running (stopping it again on exit) and builds the offline sandbox
# image (cached: seconds when current). Without an engine it still runs, on the strongest
# sandbox backend the machine offers.
#
# Usage: scripts/demo.sh [arguments for `rayflow demo`...]
#   e.g. scripts/demo.sh --modules 12 --workers 2 --out /tmp/demo
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

LOG_TAG=demo
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

./scripts/bootstrap.sh --with-docker

if ensure_docker_engine; then
    log "building the sandbox image if it is missing or out of date"
    .venv/bin/rayflow sandbox build-image
else
    log "continuing without Docker: sandboxes come from the next backend available"
fi

log "running: rayflow demo $*"
set +e
.venv/bin/rayflow demo "$@"
demo_rc=$?
set -e
exit "$demo_rc"
