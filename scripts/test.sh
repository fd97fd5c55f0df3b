#!/usr/bin/env bash
# Run rayflow's test suite on this machine: bootstrap, make sure a Docker engine is up, run pytest.
#
# Why the engine is started here: sandboxes run in containers, so their tests need a live
# engine, and CI machines start none. When `docker info` already works that engine is used and
# left alone; otherwise dockerd is started in the background and stopped again on exit.
#
# Usage: scripts/test.sh [pytest arguments...]
#   e.g. scripts/test.sh tests/unit -q
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

LOG_TAG=test
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

./scripts/bootstrap.sh --with-docker

# --- Docker engine ----------------------------------------------------------------------------
ensure_docker_engine || die "no Docker engine; the test suite needs one"
# Tests that need the engine fail (instead of skipping) when this is set.
export RAYFLOW_TEST_DOCKER=1

# --- tests ------------------------------------------------------------------------------------
log "running: .venv/bin/python -m pytest $*"
set +e
.venv/bin/python -m pytest "$@"
pytest_rc=$?
set -e

if [[ $pytest_rc == 5 ]]; then
    printf '[test] ERROR: pytest collected no tests (arguments: %s); a run that tests nothing fails\n' "${*:-none}" >&2
    exit 1
fi
exit "$pytest_rc"
