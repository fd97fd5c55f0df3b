#!/usr/bin/env bash
# Pieces shared by rayflow's scripts: logging and a Docker engine that is up while a script runs.
#
# Why shared: the test suite and the demo both run sandboxes in containers, and both must start
# an engine on machines that have none running (CI, a fresh VM) in exactly the same way. Source
# this file after setting LOG_TAG (the prefix of every message, e.g. "test" or "demo").
#
# ensure_docker_engine: when `docker info` already works that engine is used and left alone;
# otherwise dockerd is started in the background and stopped again, by its own pid, when the
# sourcing script exits. Returns non-zero (after logging why) when no engine could be had, so
# the caller decides whether that is fatal.

LOG_TAG="${LOG_TAG:-rayflow}"
DOCKERD_START_TIMEOUT_S="${DOCKERD_START_TIMEOUT_S:-60}"

log() { printf '[%s] %s\n' "$LOG_TAG" "$*"; }
die() {
    printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2
    exit 1
}

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

ensure_docker_engine() {
    if engine_answers; then
        log "Docker engine already running: using it"
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        log "dockerd not found (scripts/bootstrap.sh --with-docker installs it)"
        return 1
    fi
    dockerd_dir="$(mktemp -d "${TMPDIR:-/tmp}/rayflow-dockerd.XXXXXX")"
    log "starting dockerd (log: $dockerd_dir/dockerd.log)"
    local started_at=$SECONDS
    local started_ms
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
            log "dockerd exited during start-up (log above: $dockerd_dir/dockerd.log)"
            return 1
        fi
        if ((SECONDS - started_at >= DOCKERD_START_TIMEOUT_S)); then
            tail -n 30 "$dockerd_dir/dockerd.log" >&2 || true
            log "dockerd did not answer within ${DOCKERD_START_TIMEOUT_S} s (log above: $dockerd_dir/dockerd.log)"
            stop_dockerd
            return 1
        fi
        sleep 0.5
    done
    local elapsed_ms=$(($(date +%s%3N) - started_ms))
    log "Docker engine up after $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s"
}
