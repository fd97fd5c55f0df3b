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

DOCKERD_START_TIMEOUT_S=60

log() { printf '[test] %s\n' "$*"; }
die() {
    printf '[test] ERROR: %s\n' "$*" >&2
    exit 1
}

./scripts/bootstrap.sh --with-docker

# --- Docker engine ----------------------------------------------------------------------------
dockerd_pid=""
dockerd_dir=""

stop_dockerd() {
    # Only the engine this script started is stopped, by its own pid.
    if [[ -n $dockerd_pid ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
        log "stopping the Docker engine started for this run (pid $dockerd_pid)"
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 "$dockerd_pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$dockerd_pid" 2>/dev/null; then
            log "dockerd did not stop within 15 s; killing it"
            kill -KILL "$dockerd_pid" 2>/dev/null || true
        fi
    fi
}

engine_answers() { docker info >/dev/null 2>&1; }

if engine_answers; then
    log "Docker engine already running: using it"
else
    command -v dockerd >/dev/null 2>&1 || die "dockerd not found although bootstrap ran with --with-docker"
    dockerd_dir="$(mktemp -d "${TMPDIR:-/tmp}/rayflow-dockerd.XXXXXX")"
    log "starting dockerd (log: $dockerd_dir/dockerd.log)"
    started_at=$SECONDS
    started_ms=$(date +%s%3N)
    dockerd >"$dockerd_dir/dockerd.log" 2>&1 &
    dockerd_pid=$!
    trap stop_dockerd EXIT
    # A signal must end the script through `exit`, so that the EXIT trap stops the engine.
    trap 'exit 130' INT
    trap 'exit 143' TERM
    until engine_answers; do
        if ! kill -0 "$dockerd_pid" 2>/dev/null; then
            tail -n 30 "$dockerd_dir/dockerd.log" >&2 || true
            die "dockerd exited during start-up (log above: $dockerd_dir/dockerd.log)"
        fi
        if ((SECONDS - started_at >= DOCKERD_START_TIMEOUT_S)); then
            tail -n 30 "$dockerd_dir/dockerd.log" >&2 || true
            die "dockerd did not answer within ${DOCKERD_START_TIMEOUT_S} s (log above: $dockerd_dir/dockerd.log)"
        fi
        sleep 0.5
    done
    elapsed_ms=$(($(date +%s%3N) - started_ms))
    log "Docker engine up after $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s"
fi
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
