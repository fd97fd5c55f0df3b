"""Backend selection with injected probes and constructors: order, refusals, reasons, options."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from rayflow.errors import ConfigError
from rayflow.sandbox.select import (
    BackendChoice,
    Probe,
    Probes,
    bwrap_probe_argv,
    choose_backend,
    construct_backend,
    select_backend,
)


class Made:
    """Stands for a backend; remembers the options it was made with."""

    isolated = True

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options


def local_factory(*, registry_dir: str | None = None, use_cgroups: bool = True) -> Made:
    return Made("local", {"registry_dir": registry_dir, "use_cgroups": use_cgroups})


def process_factory(*, registry_dir: str | None = None) -> Made:
    return Made("process", {"registry_dir": registry_dir})


def docker_factory(*, network_prefix: str = "rf") -> Made:
    return Made("docker", {"network_prefix": network_prefix})


FACTORIES = {"docker": docker_factory, "local": local_factory, "process": process_factory}
UP = Probe(True, "works")


def probes(docker: Probe = UP, bwrap: Probe = UP) -> Probes:
    return Probes(docker=lambda image, build: docker, bwrap=lambda: bwrap)


def choose(name: str = "auto", **kwargs: Any) -> BackendChoice:
    kwargs.setdefault("probes", probes())
    return choose_backend(name, factories=FACTORIES, **kwargs)


def test_auto_prefers_docker_when_it_works() -> None:
    assert choose().name == "docker"


def test_auto_takes_local_when_docker_does_not_work() -> None:
    choice = choose(probes=probes(docker=Probe(False, "no engine")))
    assert choice.name == "local"
    assert "no engine" in choice.reason


def test_auto_takes_local_when_the_docker_backend_cannot_be_made() -> None:
    def broken(**_: Any) -> Made:
        raise ConfigError("docker module missing")

    choice = choose_backend(factories={**FACTORIES, "docker": broken}, probes=probes())
    assert choice.name == "local" and "docker module missing" in choice.reason


def test_auto_refuses_when_nothing_isolates() -> None:
    with pytest.raises(ConfigError, match="allow_unisolated"):
        choose(probes=probes(docker=Probe(False, "no engine"), bwrap=Probe(False, "no userns")))


def test_auto_falls_back_to_process_only_when_allowed_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rayflow.sandbox.select"):
        choice = choose(
            probes=probes(docker=Probe(False, "no engine"), bwrap=Probe(False, "no userns")),
            allow_unisolated=True,
        )
    assert choice.name == "process"
    assert "no engine" in choice.reason and "no userns" in choice.reason
    assert any("NOT ISOLATED" in r.message for r in caplog.records)


def test_auto_never_takes_process_while_an_isolating_backend_works() -> None:
    assert choose(probes=probes(docker=Probe(False, "no engine")), allow_unisolated=True).name == "local"


def test_explicit_name_skips_stronger_backends() -> None:
    assert choose("local").name == "local"


def test_explicit_unavailable_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no engine"):
        choose("docker", probes=probes(docker=Probe(False, "no engine")))


def test_explicit_process_needs_no_probe_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rayflow.sandbox.select"):
        choice = choose("process", probes=probes(docker=Probe(False, "x"), bwrap=Probe(False, "y")))
    assert choice.name == "process"
    assert any("NOT ISOLATED" in r.message for r in caplog.records)


def test_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown sandbox backend"):
        choose("firecracker")


def test_name_is_case_insensitive() -> None:
    assert choose(" Local ").name == "local"


def test_choice_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rayflow.sandbox.select"):
        choice = choose()
    assert any(choice.reason in r.getMessage() for r in caplog.records)


def test_auto_passes_each_backend_only_the_options_it_takes() -> None:
    choice = choose(probes=probes(docker=Probe(False, "no engine")), registry_dir="/r", network_prefix="x")
    assert choice.backend.options == {"registry_dir": "/r", "use_cgroups": True}


def test_auto_refuses_an_option_no_backend_takes() -> None:
    with pytest.raises(ConfigError, match="registry_dri"):
        choose(registry_dri="/r")


def test_explicit_backend_refuses_an_option_it_does_not_take() -> None:
    with pytest.raises(ConfigError, match="network_prefix"):
        choose("process", network_prefix="x")


def test_docker_probe_gets_the_image_and_build_permission() -> None:
    asked: list[tuple[str, bool]] = []

    def docker(image: str, build: bool) -> Probe:
        asked.append((image, build))
        return UP

    choose_backend(
        factories=FACTORIES, probes=Probes(docker=docker, bwrap=lambda: UP), image="x:1", build_image=True
    )
    assert asked == [("x:1", True)]


def test_select_backend_returns_the_backend_itself() -> None:
    backend = select_backend("local", factories=FACTORIES, probes=probes())
    assert isinstance(backend, Made) and backend.name == "local"


def test_construct_refuses_an_unknown_name() -> None:
    with pytest.raises(ConfigError):
        construct_backend("auto", factories=FACTORIES)


def test_bwrap_probe_makes_the_local_backends_namespaces_and_runs_true() -> None:
    argv = bwrap_probe_argv("/usr/bin/bwrap", privileged=False)
    assert argv[0] == "/usr/bin/bwrap" and argv[-1] == "/usr/bin/true"
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-user", "--proc"):
        assert flag in argv


def test_privileged_bwrap_probe_makes_no_user_namespace() -> None:
    assert "--unshare-user" not in bwrap_probe_argv("/usr/bin/bwrap", privileged=True)
