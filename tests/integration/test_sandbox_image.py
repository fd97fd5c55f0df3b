"""The sandbox image builds offline and runs the in-sandbox runtime as an unprivileged user.

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
    WORKDIR,
    ImageInfo,
    build_sandbox_image,
    image_status,
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
        ["python3", "-c", "import os, rayflow.agent, msgpack; print(os.getuid())"],
    )

    assert output == str(AGENT_UID)


def test_processes_run_as_uid_10001(docker_client: Any, sandbox_image: ImageInfo, run_id: str) -> None:
    assert _run(docker_client, sandbox_image, run_id, ["id", "-u"]) == str(AGENT_UID)


def test_workdir_is_the_workspace_and_writable(
    docker_client: Any, sandbox_image: ImageInfo, run_id: str
) -> None:
    output = _run(docker_client, sandbox_image, run_id, ["sh", "-c", "pwd && touch probe && echo written"])

    assert output.splitlines() == [WORKDIR, "written"]


def test_image_ships_only_the_runtime_part_of_rayflow(
    docker_client: Any, sandbox_image: ImageInfo, run_id: str
) -> None:
    script = (
        "import os, rayflow; "
        "print(' '.join(sorted(n for n in os.listdir(os.path.dirname(rayflow.__file__)) if n != '__pycache__')))"
    )

    output = _run(docker_client, sandbox_image, run_id, ["python3", "-c", script])

    assert output.split() == ["__init__.py", "agent", "errors.py", "framing.py"]


def test_default_command_serves_the_runtime(docker_client: Any, sandbox_image: ImageInfo) -> None:
    config = docker_client.images.get(sandbox_image.id).attrs["Config"]

    assert config["Cmd"] == ["python3", "-m", "rayflow.agent", "serve"]
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

    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", "sandbox", "build-image", "--tag", sandbox_image.tag],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert sandbox_image.tag in proc.stdout
