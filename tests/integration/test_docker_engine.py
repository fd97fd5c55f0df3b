"""Proves the Docker engine works offline: an image made here from host files runs in a container.

Why build the image from host files: the machine reaches no image registry, so the only
images are those made locally. A root filesystem holding the host's ``echo`` and ``cat`` plus
exactly the shared libraries ``ldd`` lists for them is enough to run real processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.docker]

HOST_PROGRAMS = ("/bin/echo", "/bin/cat")
TEST_LABEL = "rayflow.test-run"


def _shared_libraries(program: str) -> list[str]:
    """Absolute paths of the libraries (and the dynamic loader) ``program`` needs."""
    output = subprocess.run(["ldd", program], check=True, capture_output=True, text=True).stdout
    # Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vdso has no file.
    return re.findall(r"(/\S+) \(0x[0-9a-f]+\)", output)


def _build_root_filesystem(root: Path) -> list[str]:
    """Copy the host programs and their libraries into ``root``; returns the library dirs."""
    library_dirs: set[str] = set()
    for program in HOST_PROGRAMS:
        for source in [program, *_shared_libraries(program)]:
            target = root / source.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Follow symlinks: the image must hold the files themselves.
            shutil.copy2(Path(source).resolve(), target)
            if source != program:
                library_dirs.add(str(Path(source).parent))
    return sorted(library_dirs)


@pytest.fixture(scope="module")
def run_id() -> str:
    """Labels this module's containers and names its image, so cleanup touches only them."""
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def host_tools_image(
    docker_client: Any, tmp_path_factory: pytest.TempPathFactory, run_id: str
) -> Iterator[dict[str, Any]]:
    """An image imported from a tar of host binaries; removed (with its containers) afterwards."""
    work = tmp_path_factory.mktemp("image")
    root = work / "rootfs"
    library_dirs = _build_root_filesystem(root)
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name)

    repository, tag = "rayflow-test-host-tools", run_id
    docker_client.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    image = docker_client.images.get(f"{repository}:{tag}")
    try:
        yield {"image": image.id, "environment": {"LD_LIBRARY_PATH": ":".join(library_dirs)}}
    finally:
        for container in docker_client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_id}"}):
            container.remove(force=True)
        docker_client.images.remove(image.id, force=True)


def _run(docker_client: Any, image: dict[str, Any], run_id: str, command: list[str]) -> str:
    output = docker_client.containers.run(
        image["image"],
        command,
        environment=image["environment"],
        network_mode="none",
        labels={TEST_LABEL: run_id},
        remove=True,
    )
    return output.decode()


def test_imported_image_runs_a_host_program(
    docker_client: Any, host_tools_image: dict[str, Any], run_id: str
) -> None:
    token = f"hello-{run_id}"

    output = _run(docker_client, host_tools_image, run_id, ["/bin/echo", token])

    assert output == f"{token}\n"


def test_container_without_network_has_only_loopback(
    docker_client: Any, host_tools_image: dict[str, Any], run_id: str
) -> None:
    net_dev = _run(docker_client, host_tools_image, run_id, ["/bin/cat", "/proc/net/dev"])

    # The first two lines are headers; each further line names one interface.
    interfaces = sorted(line.split(":")[0].strip() for line in net_dev.splitlines()[2:])
    assert interfaces == ["lo"]


def test_failing_command_reports_its_exit_status(
    docker_client: Any, host_tools_image: dict[str, Any], run_id: str
) -> None:
    import docker

    with pytest.raises(docker.errors.ContainerError) as failure:
        _run(docker_client, host_tools_image, run_id, ["/bin/cat", "/no/such/file"])

    assert failure.value.exit_status == 1


def test_removed_containers_leave_nothing_behind(
    docker_client: Any, host_tools_image: dict[str, Any], run_id: str
) -> None:
    _run(docker_client, host_tools_image, run_id, ["/bin/echo", "gone"])

    leftovers = docker_client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_id}"})
    assert leftovers == []
