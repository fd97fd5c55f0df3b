"""Picks the sandbox backend: by name, or ``"auto"`` for the strongest isolation this machine offers.

Order for ``"auto"``: ``docker`` when an engine answers and the sandbox image is there (or may be
built), else ``local`` when bubblewrap can actually make namespaces here (probed once per
process by running a trivial command in a sandbox: an installed ``bwrap`` is not enough, user
namespaces may be disabled), else nothing. The ``process`` backend isolates nothing, so ``auto``
never falls back to it on its own: the caller must pass ``allow_unisolated=True``, and the choice
is logged as a warning. Every choice comes with the reason, logged and returned
(:class:`BackendChoice`), so "why is this worker running without containers?" has an answer.

The probes and the backend constructors are parameters, so the decision is tested without an
engine or namespaces.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from rayflow.errors import ConfigError
from rayflow.sandbox.backend import SandboxBackend

log = logging.getLogger("rayflow.sandbox.select")

#: Backends from the strongest isolation to none.
BACKEND_NAMES = ("docker", "local", "process")
#: Where each backend's class lives; imported only when that backend is asked for.
BACKEND_CLASSES = {
    "docker": ("rayflow.sandbox.docker_backend", "DockerBackend"),
    "local": ("rayflow.sandbox.local_backend", "LocalBackend"),
    "process": ("rayflow.sandbox.process_backend", "ProcessBackend"),
}
#: How long the Docker engine may take to answer a ping during selection.
DOCKER_PING_TIMEOUT_S = 5.0
#: How long the bubblewrap probe may run.
BWRAP_PROBE_TIMEOUT_S = 15.0

Factory = Callable[..., SandboxBackend]


@dataclass(frozen=True)
class Probe:
    """Whether a backend can work here, and why (or why not)."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class Probes:
    """The checks ``auto`` runs: Docker (given the image and whether it may build it) and bubblewrap."""

    docker: Callable[[str, bool], Probe] = field(default_factory=lambda: probe_docker)
    bwrap: Callable[[], Probe] = field(default_factory=lambda: probe_bwrap)


@dataclass(frozen=True)
class BackendChoice:
    """The backend selected and the reason it was."""

    backend: SandboxBackend
    reason: str

    @property
    def name(self) -> str:
        return self.backend.name


# --- probes (I/O) -------------------------------------------------------------------------------
def probe_engine() -> Probe:
    """Whether a Docker engine answers a ping (the image is not looked at)."""
    try:
        import docker
    except ImportError:
        return Probe(False, "the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the SDK raises DockerException, requests' or OS errors
        return Probe(False, f"no Docker engine answers ({type(exc).__name__})")
    return Probe(True, "a Docker engine answers")


def probe_docker(image: str, build_image: bool = False) -> Probe:
    """Whether a Docker engine answers and ``image`` exists and is current (building it if allowed).

    An image that carries no rayflow build hash (made some other way) counts as usable; one whose
    hash shows it ships older runtime files does not, since its runtime may not speak this
    host's protocol.
    """
    engine = probe_engine()
    if not engine.ok:
        return engine
    import docker
    from rayflow.sandbox import image as images

    client = docker.from_env(timeout=300)
    try:
        status = images.image_status(image, client=client)
        if status.present and (status.current or status.found_hash is None):
            return Probe(True, f"a Docker engine answers and image {image} is present")
        state = "out of date" if status.present else "missing"
        if not build_image:
            return Probe(False, f"image {image} is {state}; run `rayflow sandbox build-image`")
        info = images.build_sandbox_image(image, client=client)
        return Probe(
            True,
            f"a Docker engine answers and image {image} was {state}, built it in {info.built_seconds:.0f} s",
        )
    except Exception as exc:  # noqa: BLE001 - any engine or build failure means "not usable"
        return Probe(False, f"image {image} is not usable: {exc}")
    finally:
        client.close()


def bwrap_probe_argv(bwrap: str, privileged: bool) -> list[str]:
    """A ``bwrap`` command making the namespaces the local backend uses, running ``/usr/bin/true``."""
    from rayflow.sandbox.local_backend import SYSTEM_DIRS

    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not privileged:
        argv.append("--unshare-user")
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--cap-drop", "ALL", "/usr/bin/true"]
    return argv


@cache
def _probe_bwrap(path: str, privileged: bool) -> Probe:
    argv = bwrap_probe_argv(path, privileged)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=BWRAP_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(False, f"bubblewrap could not run: {exc}")
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        return Probe(
            False, f"bubblewrap cannot make namespaces here: {message[-1] if message else done.returncode}"
        )
    return Probe(True, f"bubblewrap makes namespaces here ({path})")


def probe_bwrap(bwrap: str | None = None) -> Probe:
    """Whether bubblewrap can create the local backend's namespaces; run once per process."""
    path = bwrap or shutil.which("bwrap")
    if not path:
        return Probe(False, "bubblewrap ('bwrap') is not on PATH")
    return _probe_bwrap(path, os.geteuid() == 0)


# --- construction -------------------------------------------------------------------------------
def _default_factory(name: str) -> Factory:
    module_name, class_name = BACKEND_CLASSES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"the {name} backend is not available in this rayflow: {exc}") from exc
    factory: Factory = getattr(module, class_name)
    return factory


def _accepted(factory: Factory) -> set[str] | None:
    """Keyword options ``factory`` takes (``None``: any)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def construct_backend(
    name: str, *, factories: Mapping[str, Factory] | None = None, **options: Any
) -> SandboxBackend:
    """Make the backend ``name`` with ``options``, without probing; :class:`ConfigError` if it cannot."""
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown sandbox backend {name!r}; known: {', '.join(BACKEND_NAMES)}")
    factory = (factories or {}).get(name) or _default_factory(name)
    accepted = _accepted(factory)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(f"the {name} backend takes no option {', '.join(map(repr, unknown))}")
    try:
        return factory(**options)
    except ConfigError:
        raise
    except (OSError, ImportError) as exc:
        raise ConfigError(f"the {name} backend could not start: {exc}") from exc


def _options_for(name: str, factories: Mapping[str, Factory], options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``options`` backend ``name`` takes (``auto`` passes one set to any backend)."""
    try:
        factory = factories.get(name) or _default_factory(name)
    except ConfigError:
        return dict(options)
    accepted = _accepted(factory)
    return dict(options) if accepted is None else {k: v for k, v in options.items() if k in accepted}


def _with_build(
    name: str, factories: Mapping[str, Factory], options: Mapping[str, Any], build_image: bool
) -> dict[str, Any]:
    """``options`` plus ``build_image`` for a backend that takes it (the probe decided on the image
    already; the backend must not decide differently at its first ``create``)."""
    out = dict(options)
    try:
        accepted = _accepted(factories.get(name) or _default_factory(name))
    except ConfigError:
        return out
    if accepted is not None and "build_image" in accepted:
        out.setdefault("build_image", build_image)
    return out


def _check_options_known(factories: Mapping[str, Factory], options: Mapping[str, Any]) -> None:
    """Refuse an option no backend takes (a typo would otherwise vanish silently under ``auto``)."""
    known: set[str] = set()
    for name in BACKEND_NAMES:
        try:
            accepted = _accepted(factories.get(name) or _default_factory(name))
        except ConfigError:
            continue
        if accepted is None:
            return
        known |= accepted
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"no sandbox backend takes the option {', '.join(map(repr, unknown))}")


def _warn_unisolated(reason: str) -> None:
    log.warning(
        "SANDBOXES ARE NOT ISOLATED: the process backend runs commands as this user on this host's "
        "filesystem and network (%s); never give it untrusted code",
        reason,
    )


# --- the decision -------------------------------------------------------------------------------
def choose_backend(
    name: str = "auto",
    *,
    allow_unisolated: bool = False,
    image: str | None = None,
    build_image: bool = False,
    probes: Probes | None = None,
    factories: Mapping[str, Factory] | None = None,
    **options: Any,
) -> BackendChoice:
    """Select and make a backend; see the module docstring for the order.

    ``image`` is the sandbox image Docker must have (default: the standard tag); ``build_image``
    lets the Docker probe build it when missing or out of date. ``options`` go to the chosen
    backend's constructor; under ``auto``, only those it takes.
    """
    from rayflow.sandbox.image import DEFAULT_TAG

    wanted = name.strip().lower()
    if wanted != "auto" and wanted not in BACKEND_NAMES:
        raise ConfigError(f"unknown sandbox backend {name!r}; choose auto, {', '.join(BACKEND_NAMES)}")
    probes = probes or Probes()
    factories = dict(factories or {})
    image = image or DEFAULT_TAG
    if wanted != "auto":
        choice = _explicit(wanted, probes, factories, image, build_image, options)
    else:
        _check_options_known(factories, options)
        choice = _auto(probes, factories, image, build_image, allow_unisolated, options)
    log.info("sandbox backend %r chosen: %s", choice.name, choice.reason)
    return choice


def _explicit(
    name: str,
    probes: Probes,
    factories: Mapping[str, Factory],
    image: str,
    build_image: bool,
    options: Mapping[str, Any],
) -> BackendChoice:
    if name == "docker":
        probe = probes.docker(image, build_image)
    elif name == "local":
        probe = probes.bwrap()
    else:
        probe = Probe(True, "no isolation")
    if not probe.ok:
        raise ConfigError(f"the {name} sandbox backend is not available: {probe.reason}")
    backend = construct_backend(
        name, factories=factories, **_with_build(name, factories, options, build_image)
    )
    if name == "process":
        _warn_unisolated("asked for by name")
    return BackendChoice(backend, f"asked for {name}: {probe.reason}")


def _auto(
    probes: Probes,
    factories: Mapping[str, Factory],
    image: str,
    build_image: bool,
    allow_unisolated: bool,
    options: Mapping[str, Any],
) -> BackendChoice:
    refusals: list[str] = []
    for name, probe_of in (("docker", lambda: probes.docker(image, build_image)), ("local", probes.bwrap)):
        probe = probe_of()
        if not probe.ok:
            refusals.append(f"{name}: {probe.reason}")
            continue
        try:
            chosen = _with_build(name, factories, _options_for(name, factories, options), build_image)
            backend = construct_backend(name, factories=factories, **chosen)
        except ConfigError as exc:
            refusals.append(f"{name}: {exc.message}")
            continue
        passed_over = f" (passed over {'; '.join(refusals)})" if refusals else ""
        return BackendChoice(backend, f"strongest available: {probe.reason}{passed_over}")
    summary = "; ".join(refusals)
    if not allow_unisolated:
        raise ConfigError(
            f"no isolating sandbox backend is available ({summary}); pass allow_unisolated=True to use "
            "the process backend, which isolates nothing"
        )
    backend = construct_backend("process", factories=factories, **_options_for("process", factories, options))
    reason = f"no isolating backend available ({summary}); allow_unisolated=True"
    _warn_unisolated(reason)
    return BackendChoice(backend, f"UNISOLATED fallback: {reason}")


def select_backend(name: str = "auto", **options: Any) -> SandboxBackend:
    """The backend :func:`choose_backend` picks (the choice and its reason are logged)."""
    return choose_backend(name, **options).backend
