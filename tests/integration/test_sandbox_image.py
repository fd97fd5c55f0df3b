"""The sandbox image builds offline, runs the in-sandbox runtime as an unprivileged user, and
carries the hub client (by default) without the bank's heavy packages.

Why one build per module, under the real default tag: a build takes about a minute (it runs
debootstrap against the Debian mirror), and a later run, or the Docker backend's tests, reuse
the image through its hash label instead of building again. The image is therefore left in
place; only this module's containers are removed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rayflow.sandbox.image import (
    AGENT_UID,
    DEFAULT_TAG,
    DEFAULT_WITH_HUB_CLIENT,
    HUB_CLIENT_LABEL,
    WORKDIR,
    ImageInfo,
    build_sandbox_image,
    image_status,
    package_root,
    shipped_files,
)

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.timeout(600)]

TEST_LABEL = "rayflow.test-run"


@pytest.fixture(scope="module")
def run_id() -> str:
    """Labels this module's containers, so cleanup touches only them."""
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def sandbox_image(docker_client: Any, run_id: str) -> Iterator[ImageInfo]:
    """The default sandbox image, built now or reused when current."""
    yield build_sandbox_image(DEFAULT_TAG, client=docker_client)
    for container in docker_client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_id}"}):
        container.remove(force=True)


def _run(docker_client: Any, image: ImageInfo, run_id: str, command: list[str]) -> str:
    output = docker_client.containers.run(
        image.id, command, network_mode="none", labels={TEST_LABEL: run_id}, remove=True
    )
    return output.decode().strip()


def test_runtime_and_msgpack_import_as_the_unprivileged_user(
    docker_client: Any, sandbox_image: ImageInfo, run_id: str
) -> None:
    output = _run(
        docker_client,
        sandbox_image,
        run_id,
        ["python3", "-c", "import os, rayflow.guest, msgpack; print(os.getuid())"],
    )

    assert output == str(AGENT_UID)


def test_processes_run_as_uid_10001(docker_client: Any, sandbox_image: ImageInfo, run_id: str) -> None:
    assert _run(docker_client, sandbox_image, run_id, ["id", "-u"]) == str(AGENT_UID)


def test_workdir_is_the_workspace_and_writable(
    docker_client: Any, sandbox_image: ImageInfo, run_id: str
) -> None:
    output = _run(docker_client, sandbox_image, run_id, ["sh", "-c", "pwd && touch probe && echo written"])

    assert output.splitlines() == [WORKDIR, "written"]


def test_image_ships_only_the_runtime_and_hub_client_parts_of_rayflow(
    docker_client: Any, sandbox_image: ImageInfo, run_id: str
) -> None:
    script = (
        "import os, rayflow; root = os.path.dirname(rayflow.__file__); "
        "print(' '.join(sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) "
        "for f in fs if '__pycache__' not in d and f.endswith('.py'))))"
    )

    output = _run(docker_client, sandbox_image, run_id, ["python3", "-c", script])

    assert output.split() == [name for name, _ in shipped_files(package_root())]
    assert "memory/bank.py" not in output.split() and "hub/service.py" not in output.split()


def test_image_is_built_with_the_hub_client_by_default(docker_client: Any, sandbox_image: ImageInfo) -> None:
    labels = docker_client.images.get(sandbox_image.id).attrs["Config"]["Labels"]

    assert DEFAULT_WITH_HUB_CLIENT
    assert labels[HUB_CLIENT_LABEL] == "1"


def test_hub_client_imports_offline_without_heavy_packages(
    docker_client: Any, sandbox_image: ImageInfo, run_id: str
) -> None:
    script = (
        "import sys, rayflow.wire.hub_client; "
        "print([m for m in ('numpy', 'hnswlib', 'apsw', 'ray', 'jwt') if m in sys.modules])"
    )

    output = _run(docker_client, sandbox_image, run_id, ["python3", "-c", script])

    assert output == "[]"


def test_image_carries_no_numpy(docker_client: Any, sandbox_image: ImageInfo, run_id: str) -> None:
    script = "import importlib.util; print(importlib.util.find_spec('numpy') is None)"

    assert _run(docker_client, sandbox_image, run_id, ["python3", "-c", script]) == "True"


def test_default_command_serves_the_runtime(docker_client: Any, sandbox_image: ImageInfo) -> None:
    config = docker_client.images.get(sandbox_image.id).attrs["Config"]

    assert config["Cmd"] == ["python3", "-m", "rayflow.guest", "serve"]
    assert config["User"] == "agent"


def test_second_build_reuses_the_cached_image(docker_client: Any, sandbox_image: ImageInfo) -> None:
    again = build_sandbox_image(DEFAULT_TAG, client=docker_client)

    assert again.cached
    assert again.id == sandbox_image.id


def test_status_reports_the_built_image_as_current(docker_client: Any, sandbox_image: ImageInfo) -> None:
    status = image_status(DEFAULT_TAG, client=docker_client)

    assert status.present and status.current
    assert status.id == sandbox_image.id


def test_cli_build_image_reports_the_cached_image(docker_client: Any, sandbox_image: ImageInfo) -> None:
    import subprocess
    import sys

    # The flag follows the image default explicitly, so the command finds the cached image
    # whatever the command line's own default is.
    flag = "--with-hub-client" if DEFAULT_WITH_HUB_CLIENT else "--no-with-hub-client"
    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", "sandbox", "build-image", "--tag", sandbox_image.tag, flag],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert sandbox_image.tag in proc.stdout
    assert "up to date" in proc.stdout
