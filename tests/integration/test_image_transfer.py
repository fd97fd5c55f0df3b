"""The sandbox image moves from one real Docker engine to another: exported, loaded, checked.

Why a second engine of its own: nodes of one machine share the main engine, so moving an image
"between nodes" there would load it where it already is. This module starts a second ``dockerd``
with its own data, state, socket and pid file (no bridge, no iptables: it runs no container, it
only stores images), moves the real ``rayflow-sandbox:latest`` into it and removes it all after.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.errors import PayloadTooLargeError, RayflowError
from rayflow.sandbox.image import DEFAULT_TAG, HASH_LABEL, build_sandbox_image, image_status
from rayflow.sandbox.image_transfer import (
    ExportedImage,
    engine_id,
    export_image,
    load_image,
    probe_engine_image,
)

pytestmark = [pytest.mark.integration, pytest.mark.docker]

#: How long the second engine may take to answer after it is started.
ENGINE_START_TIMEOUT_S = 60.0
ENGINE_STOP_TIMEOUT_S = 30.0


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        points = [line.split()[4].replace("\\040", " ") for line in mountinfo]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _stop_engine(process: subprocess.Popen[bytes], root: Path) -> None:
    """Stop the engine (SIGTERM, then SIGKILL to its process group) and delete its directories."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=ENGINE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=ENGINE_STOP_TIMEOUT_S)
    for point in _mounts_below(root):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    leftover = _mounts_below(root)
    assert leftover == [], f"the second engine left mounts {leftover}"
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def second_engine(docker_client: Any) -> Iterator[Any]:
    """A Docker client of a second engine, started for this module and removed after it."""
    import docker

    if os.geteuid() != 0:
        pytest.skip("starting a second dockerd needs root")
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed, although a Docker engine answers", pytrace=False)
    # Short paths: the engine's and its containerd's unix sockets must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="rf-dockerd-", dir="/tmp"))
    socket = root / "docker.sock"
    argv = [
        "dockerd",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'dockerd.pid'}",
        f"--host=unix://{socket}",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
    ]
    log_path = root / "dockerd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    client = None
    try:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the second dockerd exited ({process.returncode}): "
                            f"{log_path.read_text(errors='replace')[-2000:]}", pytrace=False)
            try:
                client = docker.DockerClient(base_url=f"unix://{socket}", timeout=300)
                client.ping()
                break
            except docker.errors.DockerException:
                if client is not None:
                    client.close()
                    client = None
                if time.monotonic() > deadline:
                    pytest.fail(f"the second dockerd did not answer within {ENGINE_START_TIMEOUT_S} s: "
                                f"{log_path.read_text(errors='replace')[-2000:]}", pytrace=False)
                time.sleep(0.2)  # polling the socket until the engine answers, not a stand-in
        yield client
    finally:
        if client is not None:
            client.close()
        _stop_engine(process, root)


@pytest.fixture(scope="module")
def exported(docker_client: Any) -> ExportedImage:
    """The real sandbox image of the main engine (built if missing or stale; cached), exported."""
    build_sandbox_image(DEFAULT_TAG, client=docker_client)
    return export_image(DEFAULT_TAG, client=docker_client)


def test_the_two_engines_name_themselves_differently(docker_client: Any, second_engine: Any) -> None:
    first, second = engine_id(docker_client), engine_id(second_engine)
    assert first and second and first != second


def test_the_exported_image_is_loaded_into_the_other_engine_and_is_current_there(
    docker_client: Any, second_engine: Any, exported: ExportedImage
) -> None:
    import docker

    source = docker_client.images.get(DEFAULT_TAG)
    assert exported.image_hash == source.labels[HASH_LABEL] and exported.image_id == source.id
    assert exported.size > 50_000_000  # a whole Debian root filesystem with Python, not a stub
    try:
        second_engine.images.remove(DEFAULT_TAG, force=True)
    except docker.errors.ImageNotFound:
        pass
    before = probe_engine_image(DEFAULT_TAG, client=second_engine)
    assert (before.present, before.current) == (False, False)

    status = load_image(exported.data, tag=DEFAULT_TAG, image_hash=exported.image_hash, client=second_engine)

    assert status.present and status.current
    assert image_status(DEFAULT_TAG, client=second_engine) == status
    loaded = second_engine.images.get(DEFAULT_TAG)
    assert loaded.labels[HASH_LABEL] == exported.image_hash and DEFAULT_TAG in loaded.tags
    after = probe_engine_image(DEFAULT_TAG, client=second_engine)
    assert (after.engine_id, after.present, after.current) == (engine_id(second_engine), True, True)


def test_an_image_larger_than_allowed_is_refused_with_a_typed_error(docker_client: Any) -> None:
    with pytest.raises(PayloadTooLargeError) as caught:
        export_image(DEFAULT_TAG, max_bytes=1_000_000, client=docker_client)
    assert caught.value.code == "payload_too_large"
    assert caught.value.details["max_bytes"] == 1_000_000 and DEFAULT_TAG in caught.value.message


def test_an_archive_of_another_image_than_expected_is_refused(second_engine: Any, exported: ExportedImage) -> None:
    with pytest.raises(RayflowError, match=HASH_LABEL) as caught:
        load_image(exported.data, tag=DEFAULT_TAG, image_hash="0" * 64, client=second_engine)
    assert "the source's is " + "0" * 64 in caught.value.message
    with pytest.raises(RayflowError, match="not rayflow-other:latest"):
        load_image(exported.data, tag="rayflow-other:latest", image_hash=exported.image_hash, client=second_engine)
