"""Builds the sandbox container image (Python 3, msgpack, the in-sandbox runtime) and caches it by hash.

Why build locally: sandbox machines often reach no image registry, so the default method makes
a Debian root filesystem with ``debootstrap`` from the Debian mirror apt already uses and
imports it as an image; no base image is pulled. Where a registry is reachable,
``docker/Dockerfile`` gives the same image with ``docker build`` (``method="dockerfile"``).

Why a hash label: building costs tens of seconds, so an image is rebuilt only when what it
would ship changed. The hash covers the build recipe and parameters and the bytes of every
shipped rayflow file; it is stored as the label ``rayflow.image-hash`` and compared before
building. Of rayflow the image holds exactly two folders, ``rayflow/guest/`` (what runs inside a
sandbox) and ``rayflow/wire/`` (what crosses the wall, the hub client included), plus
``rayflow/__init__.py`` and ``errors.py``: agents reach the ReasoningBank through
``AgentContext.memory``, but the bank itself, its index and the token machinery never enter a
sandbox.

The hub client's third-party packages (aioquic and its dependencies; msgpack comes from Debian)
are copied from this machine's Python environment when its minor version matches the image's
Python (wheels are compiled per minor version), otherwise fetched as wheels with pip. Building
without them (``with_hub_client=False``) gives a smaller image whose agents cannot use memory
(the client modules are there, their packages are not: ``context.memory`` says so).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from rayflow.errors import ConfigError, RayflowError

#: Image every backend uses unless told otherwise (the same default as ``SandboxSpec.image``).
DEFAULT_TAG = "rayflow-sandbox:latest"
#: Label holding the hash of what the image ships and how it was built.
HASH_LABEL = "rayflow.image-hash"
#: Labels recording the build parameters, so an image's currency can be judged without them.
METHOD_LABEL = "rayflow.build-method"
HUB_CLIENT_LABEL = "rayflow.hub-client"
PYTHON_LABEL = "rayflow.python-version"

#: Bump whenever a change to this module changes what lands in the image.
RECIPE_VERSION = 3
METHODS = ("debootstrap", "dockerfile")

AGENT_USER = "agent"
AGENT_UID = 10001
WORKDIR = "/workspace"
HOME = f"/home/{AGENT_USER}"

DEBIAN_SUITE = "bookworm"
#: Python minor version of ``DEBIAN_SUITE``'s python3 package.
IMAGE_PYTHON = (3, 11)
DEBIAN_PACKAGES = ("python3", "python3-msgpack")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Where pip-style packages go in the image: Debian's python3 searches it before its own.
LOCAL_SITE = f"usr/local/lib/python{IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]}/dist-packages"

#: Top-level requirements of the hub client; their dependencies are followed. (msgpack, its
#: other one, is Debian's python3-msgpack, already there for the runtime.)
HUB_CLIENT_REQUIREMENTS = ("aioquic",)
#: Whether builds include the hub client unless told otherwise. On, because an agent's
#: ``context.memory`` is the point of a sandbox that may reach a hub; it adds about 21 MB
#: (``docker images``: 117 MB without, 138 MB with).
DEFAULT_WITH_HUB_CLIENT = True

#: What of rayflow a sandbox holds: the package marker, the error hierarchy (its codes travel
#: through the channel and over RPC) and two whole folders, ``guest`` (everything that runs inside a
#: sandbox) and ``wire`` (what crosses the wall, shared with the host). The import contracts in
#: ``pyproject.toml`` keep ``guest`` and ``wire`` from reaching anything else of rayflow, so these
#: folders are complete by construction: no list of modules to keep in step by hand.
SHIPPED_FILES = ("__init__.py", "errors.py")
SHIPPED_TREES = ("guest", "wire")

#: Paths of the root filesystem no sandbox needs: package caches and lists, documentation,
#: translations; together about half of a fresh debootstrap.
TRIMMED_PATHS = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
)
#: Files debootstrap copies from the host; Docker provides its own at run time.
HOST_IDENTITY_FILES = ("etc/resolv.conf", "etc/hostname")

#: Called with a short description of the current step and the fraction (0..1) of the build done.
ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class ImageInfo:
    """A sandbox image that is present and current."""

    tag: str
    id: str
    size_bytes: int
    python_version: str
    #: Seconds this call spent building; 0.0 when the cached image was reused.
    built_seconds: float
    #: True when an image with a matching hash was already present and nothing was built.
    cached: bool = False


@dataclass(frozen=True)
class ImageStatus:
    """Whether an image tag exists and whether it still matches what a build would make."""

    tag: str
    present: bool
    #: True when the image's hash label matches the hash for its own recorded build parameters.
    current: bool
    id: str | None = None
    found_hash: str | None = None
    expected_hash: str | None = None
    method: str | None = None
    with_hub_client: bool | None = None


# --- what is shipped (pure) ---------------------------------------------------------------------
def package_root() -> Path:
    """Directory of the running ``rayflow`` package, whose runtime files are shipped.

    Found from this file rather than by importing ``rayflow``: the package's ``__init__`` is the
    face of the library (``rayflow.init``), which host-side code below it must not depend on.
    """
    return Path(__file__).resolve().parents[1]


def shipped_files(source_dir: Path) -> list[tuple[str, Path]]:
    """(path inside the image's ``rayflow`` package, host file) of every shipped file, sorted.

    ``SHIPPED_FILES`` plus every source file under ``SHIPPED_TREES``. Compiled caches are left
    out because the image compiles its own.
    """
    if not (source_dir / "guest" / "__init__.py").is_file():
        raise ConfigError(f"no in-sandbox runtime at {source_dir / 'guest'} (rayflow/guest/__init__.py is missing)")
    files = [(name, source_dir / name) for name in SHIPPED_FILES]
    for tree in SHIPPED_TREES:
        for path in sorted((source_dir / tree).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                files.append((path.relative_to(source_dir).as_posix(), path))
    for _, path in files:
        if not path.is_file():
            raise ConfigError(f"shipped file {path} is missing")
    return sorted(files)


def image_hash(
    files: Iterable[tuple[str, Path]],
    *,
    method: str,
    with_hub_client: bool,
    hub_client_pins: Iterable[str] = (),
    dockerfile: bytes = b"",
) -> str:
    """Hash of everything that decides an image's content: recipe, parameters, shipped bytes."""
    digest = hashlib.sha256()

    def add(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)

    add(f"recipe={RECIPE_VERSION}", f"method={method}", f"hub-client={int(with_hub_client)}")
    add(f"user={AGENT_USER}:{AGENT_UID}", f"workdir={WORKDIR}")
    if method == "debootstrap":
        add(f"suite={DEBIAN_SUITE}", *DEBIAN_PACKAGES, *TRIMMED_PATHS)
    else:
        add(dockerfile)
    if with_hub_client:
        add(*sorted(hub_client_pins))
    for name, path in files:
        add(name, path.read_bytes())
    return digest.hexdigest()


def image_changes(labels: dict[str, str]) -> list[str]:
    """Dockerfile instructions applied on import: user, working directory, environment, command."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": HOME,
        "PYTHONUNBUFFERED": "1",
    }
    changes = [f"ENV {key}={value}" for key, value in env.items()]
    changes += [f'LABEL {key}="{value}"' for key, value in sorted(labels.items())]
    changes += [
        f"USER {AGENT_USER}",
        f"WORKDIR {WORKDIR}",
        # A command rather than an entrypoint: `docker run IMAGE cmd...` replaces it without
        # --entrypoint, and the Docker backend passes it explicitly anyway.
        'CMD ["python3", "-m", "rayflow.guest", "serve"]',
    ]
    return changes


def debian_mirror(sources: Iterable[str], suite: str = DEBIAN_SUITE) -> str:
    """The Debian archive URI apt uses for ``suite``, read from sources files' text.

    Understands both one-line ``sources.list`` entries and deb822 ``.sources`` stanzas; the
    security archive is skipped (it holds only updates). Falls back to deb.debian.org.
    """
    for text in sources:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                line = line.strip()
                if line.startswith("deb ") and not line.startswith("deb-src"):
                    tokens = [t for t in re.sub(r"\[[^]]*\]", " ", line).split()[1:]]
                    if len(tokens) >= 2 and tokens[1] == suite:
                        return tokens[0].rstrip("/")
                key, sep, value = line.partition(":")
                if sep and not line.startswith("#"):
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                for uri in fields.get("uris", "").split():
                    if "security" not in uri:
                        return uri.rstrip("/")
    return DEFAULT_MIRROR


def _marker_environment() -> dict[str, str]:
    """Environment markers of the image's Python, for evaluating dependencies' conditions."""
    minor = f"{IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]}"
    return {
        "python_version": minor,
        "python_full_version": f"{minor}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": platform.machine(),
        "extra": "",
    }


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hub_client_distributions() -> list[metadata.Distribution] | None:
    """The installed distributions the hub client needs, or ``None`` if one is not installed here."""
    from packaging.requirements import Requirement

    environment = _marker_environment()
    found: dict[str, metadata.Distribution] = {}
    pending = list(HUB_CLIENT_REQUIREMENTS)
    while pending:
        name = _normalized(pending.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None
        found[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(requirement.name)
    return [found[name] for name in sorted(found)]


def _hub_client_pins(dists: list[metadata.Distribution] | None) -> list[str]:
    if dists is None:
        return [f"{name} (latest wheel)" for name in HUB_CLIENT_REQUIREMENTS]
    return [f"{_normalized(d.metadata['Name'])}=={d.version}" for d in dists]


def _can_copy_host_wheels() -> bool:
    return sys.version_info[:2] == IMAGE_PYTHON and sys.platform == "linux"


def expected_hash(method: str, with_hub_client: bool, source_dir: Path | None = None) -> str:
    """Hash a build with these parameters would label its image with."""
    if method not in METHODS:
        raise ConfigError(f"unknown image build method {method!r} (known: {', '.join(METHODS)})")
    files = shipped_files(source_dir or package_root())
    dists = hub_client_distributions() if with_hub_client and _can_copy_host_wheels() else None
    dockerfile = _dockerfile_path().read_bytes() if method == "dockerfile" else b""
    return image_hash(
        files,
        method=method,
        with_hub_client=with_hub_client,
        hub_client_pins=_hub_client_pins(dists) if with_hub_client else (),
        dockerfile=dockerfile,
    )


def _dockerfile_path() -> Path:
    path = package_root().parent / "docker" / "Dockerfile"
    if not path.is_file():
        raise ConfigError(f"{path} not found: the dockerfile method needs a rayflow source checkout")
    return path


# --- root filesystem (I/O) ----------------------------------------------------------------------
def _run(argv: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise RayflowError(f"{what} failed (exit {result.returncode}): " + "\n".join(tail))
    return result


#: About how many "I: ..." lines debootstrap prints for this suite and package set (one per
#: package and step); progress is the share of them seen so far.
_DEBOOTSTRAP_EXPECTED_LINES = 540


def _debootstrap(root: Path, mirror: str, progress: ProgressCallback) -> None:
    """Install a minimal Debian with python3 and msgpack into ``root``."""
    if shutil.which("debootstrap") is None:
        raise ConfigError("debootstrap is not installed (apt-get install debootstrap)")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(DEBIAN_PACKAGES)}",
        DEBIAN_SUITE,
        str(root),
        mirror,
    ]
    log: list[str] = []
    seen = 0
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.rstrip())
            if line.startswith("I: "):
                seen += 1
                progress(
                    f"debootstrap: {line[3:].strip()}",
                    0.02 + 0.53 * min(1.0, seen / _DEBOOTSTRAP_EXPECTED_LINES),
                )
    if proc.returncode != 0:
        raise RayflowError(f"debootstrap failed (exit {proc.returncode}): " + "\n".join(log[-15:]))


def _add_agent_user(root: Path) -> None:
    _run(
        [
            "useradd",
            "--root",
            str(root),
            "--uid",
            str(AGENT_UID),
            "--user-group",
            "--create-home",
            "--home-dir",
            HOME,
            "--shell",
            "/bin/bash",
            AGENT_USER,
        ],
        "creating the agent user",
    )
    workdir = root / WORKDIR.lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chown(workdir, AGENT_UID, AGENT_UID)
    workdir.chmod(0o755)


def _install_file(source: Path, target: Path) -> None:
    """Copy one file owned by root, readable by all, executable if the source is."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)


def _install_rayflow(site: Path, files: list[tuple[str, Path]]) -> None:
    for name, source in files:
        _install_file(source, site / "rayflow" / name)


def _copy_distributions(site: Path, dists: list[metadata.Distribution]) -> None:
    """Copy installed distributions file by file (as their RECORD lists them) into ``site``."""
    for dist in dists:
        base = Path(str(dist.locate_file(""))).resolve()
        for entry in dist.files or []:
            relative = PurePosixPath(str(entry))
            # Scripts live outside site-packages ("../../bin/x"); caches are rebuilt in the image.
            if ".." in relative.parts or "__pycache__" in relative.parts or relative.suffix == ".pyc":
                continue
            source = base / relative
            if source.is_file():
                _install_file(source, site / relative)


def _pip_download_distributions(site: Path, work: Path) -> None:
    """Install the hub client's wheels for the image's Python with pip (needs the package index)."""
    minor = f"{IMAGE_PYTHON[0]}{IMAGE_PYTHON[1]}"
    machine = platform.machine()
    target = work / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            minor,
            "--platform",
            f"manylinux_2_28_{machine}",
            "--platform",
            f"manylinux_2_17_{machine}",
            "--platform",
            f"manylinux2014_{machine}",
            "--target",
            str(target),
            *HUB_CLIENT_REQUIREMENTS,
        ],
        "downloading the hub client wheels",
    )
    shutil.rmtree(target / "bin", ignore_errors=True)
    shutil.copytree(target, site, dirs_exist_ok=True)


def _prune_test_suites(site: Path) -> None:
    """Delete the test suites third-party packages ship (they are dead weight in a sandbox)."""
    for path in sorted(site.rglob("tests"), key=lambda p: len(p.parts)):
        if path.is_dir() and path.exists() and path.relative_to(site).parts[0] != "rayflow":
            shutil.rmtree(path)


def _trim(root: Path) -> None:
    for relative in TRIMMED_PATHS:
        path = root / relative
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for relative in HOST_IDENTITY_FILES:
        path = root / relative
        if path.exists() or path.is_symlink():
            path.unlink()


def _python_version(root: Path) -> str:
    result = _run(
        ["chroot", str(root), "python3", "-c", "import platform; print(platform.python_version())"],
        "asking the image's python3 for its version",
    )
    return result.stdout.strip()


def _compile(root: Path) -> None:
    """Byte-compile the added packages with the image's own python3 (the agent cannot write caches)."""
    _run(
        ["chroot", str(root), "python3", "-m", "compileall", "-q", "/" + LOCAL_SITE],
        "byte-compiling the image's packages",
    )


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                mounts.append(point)
    return sorted(mounts, key=len, reverse=True)


def _remove_tree(root: Path) -> None:
    """Delete a build directory, first undoing any mount a failed debootstrap left inside it.

    Deleting through a leftover bind mount of /dev or /proc would reach the host's files, so
    a mount that cannot be undone stops the cleanup instead.
    """
    if not root.exists():
        return
    for point in _mounts_below(root):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    remaining = _mounts_below(root)
    if remaining:
        raise RayflowError(f"build directory {root} still has mounts {remaining}; not deleting it")
    shutil.rmtree(root)


def _tar_stream(root: Path) -> Iterator[bytes]:
    """The root filesystem as a tar stream, numeric owners kept (everything root but the agent's).

    Streamed rather than written to a file: the archive is as large as the image.
    """
    argv = ["tar", "--numeric-owner", "-C", str(root), "-cf", "-", "."]
    with tempfile.TemporaryFile() as errors:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(1 << 20):
                yield chunk
        if proc.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
            raise RayflowError(f"tar of the root filesystem failed (exit {proc.returncode}): {message}")


# --- docker (I/O) -------------------------------------------------------------------------------
def _client() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as exc:  # the SDK raises DockerException, requests' or OS errors
        raise ConfigError(f"no Docker engine answers: {exc}") from exc
    return client


def _find_image(client: Any, tag: str) -> Any | None:
    import docker

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


def _labels(image: Any) -> dict[str, str]:
    return dict((image.attrs.get("Config") or {}).get("Labels") or {})


def _split_tag(tag: str) -> tuple[str, str]:
    repository, sep, name = tag.rpartition(":")
    if not sep or "/" in name:
        return tag, "latest"
    return repository, name


def _drop_replaced(client: Any, old_id: str | None, new_id: str) -> None:
    """Remove the image a rebuild replaced, unless a container or another tag still uses it."""
    import docker

    if old_id and old_id != new_id:
        try:
            client.images.remove(old_id, noprune=False)
        except docker.errors.APIError:
            pass


def _python_of(image: Any) -> str:
    """The image's Python version: our label, else the official python images' PYTHON_VERSION."""
    config = image.attrs.get("Config") or {}
    env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
    return _labels(image).get(PYTHON_LABEL) or env.get("PYTHON_VERSION", "")


def _info(image: Any, tag: str, built_seconds: float, cached: bool) -> ImageInfo:
    return ImageInfo(
        tag=tag,
        id=image.id,
        size_bytes=int(image.attrs.get("Size") or 0),
        python_version=_python_of(image),
        built_seconds=built_seconds,
        cached=cached,
    )


def image_status(
    tag: str = DEFAULT_TAG, *, client: Any | None = None, source_dir: Path | None = None
) -> ImageStatus:
    """Whether ``tag`` exists and whether its content matches the current rayflow runtime files."""
    own_client = client is None
    client = client or _client()
    try:
        image = _find_image(client, tag)
        if image is None:
            return ImageStatus(tag=tag, present=False, current=False)
        labels = _labels(image)
        method = labels.get(METHOD_LABEL)
        with_hub = labels.get(HUB_CLIENT_LABEL) == "1" if HUB_CLIENT_LABEL in labels else None
        found = labels.get(HASH_LABEL)
        expected = None
        if method in METHODS and with_hub is not None:
            expected = expected_hash(method, with_hub, source_dir)
        return ImageStatus(
            tag=tag,
            present=True,
            current=found is not None and found == expected,
            id=image.id,
            found_hash=found,
            expected_hash=expected,
            method=method,
            with_hub_client=with_hub,
        )
    finally:
        if own_client:
            client.close()


def _build_debootstrap(
    client: Any,
    tag: str,
    labels: dict[str, str],
    with_hub_client: bool,
    files: list[tuple[str, Path]],
    mirror: str,
    progress: ProgressCallback,
) -> None:
    if os.geteuid() != 0:
        raise ConfigError("the debootstrap method needs root (it creates device nodes and chroots)")
    work = Path(tempfile.mkdtemp(prefix="rayflow-image-"))
    try:
        root = work / "rootfs"
        progress(f"debootstrap {DEBIAN_SUITE} from {mirror}", 0.02)
        _debootstrap(root, mirror, progress)
        progress("adding the agent user", 0.56)
        _add_agent_user(root)
        site = root / LOCAL_SITE
        _install_rayflow(site, files)
        if with_hub_client:
            dists = hub_client_distributions() if _can_copy_host_wheels() else None
            if dists is not None:
                progress(f"copying {len(dists)} hub client packages from this Python", 0.6)
                _copy_distributions(site, dists)
            else:
                progress("downloading hub client wheels", 0.6)
                _pip_download_distributions(site, work)
            _prune_test_suites(site)
        progress("byte-compiling", 0.66)
        _compile(root)
        labels[PYTHON_LABEL] = _python_version(root)
        progress("trimming caches and documentation", 0.72)
        _trim(root)
        progress(f"importing into Docker as {tag}", 0.75)
        repository, name = _split_tag(tag)
        answer = client.api.import_image(
            src=_tar_stream(root),
            repository=repository,
            tag=name,
            changes=image_changes(labels),
            stream_src=True,
        )
        for line in str(answer).splitlines():
            if '"error' in line:
                raise RayflowError(f"docker import of {tag} failed: {line.strip()}")
    finally:
        _remove_tree(work)


def _build_dockerfile(
    client: Any,
    tag: str,
    labels: dict[str, str],
    with_hub_client: bool,
    files: list[tuple[str, Path]],
    progress: ProgressCallback,
) -> None:
    """``docker build`` of docker/Dockerfile over a context holding only the shipped files."""
    import docker

    work = Path(tempfile.mkdtemp(prefix="rayflow-image-"))
    try:
        shutil.copyfile(_dockerfile_path(), work / "Dockerfile")
        for name, source in files:
            _install_file(source, work / "rayflow" / name)
        progress("docker build", 0.05)
        try:
            stream = client.api.build(
                path=str(work),
                tag=tag,
                labels=labels,
                rm=True,
                forcerm=True,
                decode=True,
                buildargs={"WITH_HUB_CLIENT": "1" if with_hub_client else "0"},
            )
            for event in stream:
                if "error" in event:
                    raise RayflowError(f"docker build failed: {event['error'].strip()}")
                text = str(event.get("stream", "")).strip()
                step = re.match(r"Step (\d+)/(\d+)", text)
                if step:
                    progress(text, 0.05 + 0.9 * int(step[1]) / int(step[2]))
        except docker.errors.APIError as exc:
            raise RayflowError(f"docker build failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_sandbox_image(
    tag: str = DEFAULT_TAG,
    *,
    method: str = "debootstrap",
    with_hub_client: bool = DEFAULT_WITH_HUB_CLIENT,
    force: bool = False,
    progress: ProgressCallback | None = None,
    client: Any | None = None,
    source_dir: Path | None = None,
    mirror: str | None = None,
) -> ImageInfo:
    """Build the sandbox image as ``tag``, or reuse it when its hash label says it is current.

    ``source_dir`` is the rayflow package whose runtime files are shipped (default: the running
    one); ``mirror`` the Debian archive (default: the one apt uses here).
    """
    report: ProgressCallback = progress or (lambda message, fraction: None)
    files = shipped_files(source_dir or package_root())
    wanted = expected_hash(method, with_hub_client, source_dir)
    own_client = client is None
    client = client or _client()
    try:
        existing = _find_image(client, tag)
        if existing is not None and not force and _labels(existing).get(HASH_LABEL) == wanted:
            report("image is current", 1.0)
            return _info(existing, tag, 0.0, cached=True)
        labels = {HASH_LABEL: wanted, METHOD_LABEL: method, HUB_CLIENT_LABEL: "1" if with_hub_client else "0"}
        started = time.monotonic()
        if method == "debootstrap":
            apt_sources = [p.read_text(errors="replace") for p in _apt_source_files()]
            _build_debootstrap(
                client, tag, labels, with_hub_client, files, mirror or debian_mirror(apt_sources), report
            )
        else:
            _build_dockerfile(client, tag, labels, with_hub_client, files, report)
        image = client.images.get(tag)
        if _labels(image).get(HASH_LABEL) != wanted:
            raise RayflowError(f"built image {tag} does not carry the expected {HASH_LABEL} label")
        _drop_replaced(client, existing.id if existing is not None else None, image.id)
        report("done", 1.0)
        return _info(image, tag, time.monotonic() - started, cached=False)
    finally:
        if own_client:
            client.close()


def _apt_source_files() -> list[Path]:
    etc = Path("/etc/apt")
    files = [etc / "sources.list"] if (etc / "sources.list").is_file() else []
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
    return files
