"""The hub client stays light enough for a sandbox image, and the image ships exactly what it loads."""

from __future__ import annotations

import array
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayflow.auth.claims import ALL_SCOPES, Scope
from rayflow.errors import ConfigError
from rayflow.guest.runner import hub_settings
from rayflow.sandbox.image import (
    HUB_CLIENT_REQUIREMENTS,
    SHIPPED_FILES,
    SHIPPED_TREES,
    expected_hash,
    hub_client_distributions,
    package_root,
    shipped_files,
)
from rayflow.wire import hub_ops as ops
from rayflow.wire.hub_client import _as_bytes

HEAVY = ("numpy", "hnswlib", "apsw", "ray", "jwt")
REPO = Path(__file__).resolve().parents[2]

#: Imports the client in a fresh interpreter and prints what got loaded.
PROBE = f"""
import json, sys
import rayflow.wire.hub_client
print(json.dumps({{
    "heavy": [m for m in {HEAVY!r} if m in sys.modules],
    "rayflow": sorted(m for m in sys.modules if m == "rayflow" or m.startswith("rayflow.")),
}}))
"""


def _probe() -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(proc.stdout)


def test_importing_the_client_loads_no_heavy_package() -> None:
    assert _probe()["heavy"] == []


def test_the_image_ships_every_rayflow_module_the_client_loads() -> None:
    shipped = {name for name, _ in shipped_files(package_root())}
    loaded = _probe()["rayflow"]

    missing = []
    for module in loaded:
        parts = module.split(".")[1:]
        candidates = (
            {"/".join([*parts, "__init__.py"]), "/".join(parts) + ".py"} if parts else {"__init__.py"}
        )
        if not candidates & shipped:
            missing.append(module)
    assert missing == []


def test_the_image_ships_the_guest_and_wire_folders_and_nothing_else_of_rayflow() -> None:
    names = {name for name, _ in shipped_files(package_root())}

    in_trees = {name for name in names if name.split("/")[0] in SHIPPED_TREES}
    assert names - in_trees == set(SHIPPED_FILES)
    assert {name.split("/")[0] for name in in_trees} == {"guest", "wire"}
    assert not any(name.startswith(("hub/", "rpc/", "memory/", "swarm/", "sandbox/")) for name in names)


def test_a_new_guest_module_is_shipped_without_touching_any_list(tmp_path: Path) -> None:
    for name in ("__init__.py", "errors.py", "guest/__init__.py", "guest/agents/new_agent.py", "wire/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "bank.py").write_text("")

    names = [name for name, _ in shipped_files(tmp_path)]

    assert names == ["__init__.py", "errors.py", "guest/__init__.py", "guest/agents/new_agent.py", "wire/x.py"]


def test_the_image_hash_tells_builds_with_and_without_the_client_apart() -> None:
    assert expected_hash("debootstrap", True) != expected_hash("debootstrap", False)


def test_the_copied_packages_are_aioquic_and_its_dependencies_only() -> None:
    dists = hub_client_distributions()

    assert HUB_CLIENT_REQUIREMENTS == ("aioquic",)
    assert dists is not None
    names = {d.metadata["Name"].lower() for d in dists}
    assert "aioquic" in names and "cryptography" in names
    assert not names & {"numpy", "hnswlib", "apsw", "ray", "pyjwt", "msgpack"}


def test_dockerfile_ships_the_same_rayflow_files_as_the_image_builder() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    keep = re.search(r'keep="([^"$]+)"', text)

    assert keep is not None
    assert keep[1].split() == [*SHIPPED_FILES, *SHIPPED_TREES]


def test_op_scopes_are_the_token_scopes() -> None:
    assert (ops.READ, ops.WRITE, ops.ADMIN) == (Scope.READ, Scope.WRITE, Scope.ADMIN)
    assert {info.scope for info in ops.OPS.values()} <= ALL_SCOPES


def test_only_read_ops_may_be_replayed() -> None:
    assert {op for op, info in ops.OPS.items() if info.idempotent} == {
        op for op, info in ops.OPS.items() if info.scope == ops.READ
    }


@pytest.mark.parametrize(
    "vector",
    [
        np.array([0.5, -1.0, 2.25], dtype=np.float64),
        np.array([0.5, -1.0, 2.25], dtype=np.float32),
        [0.5, -1.0, 2.25],
        (0.5, -1, 2.25),
        array.array("f", [0.5, -1.0, 2.25]),
        array.array("d", [0.5, -1.0, 2.25]),
        struct.pack("<3f", 0.5, -1.0, 2.25),
    ],
    ids=["ndarray-f8", "ndarray-f4", "list", "tuple", "array-f", "array-d", "bytes"],
)
def test_embeddings_travel_as_little_endian_float32(vector: object) -> None:
    assert _as_bytes(vector) == struct.pack("<3f", 0.5, -1.0, 2.25)  # type: ignore[arg-type]


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
FULL = {
    "RAYFLOW_HUB_HOST": "10.0.0.1",
    "RAYFLOW_HUB_PORT": "4433",
    "RAYFLOW_HUB_CA": PEM,
    "RAYFLOW_HUB_TOKEN": "tok",
}


def test_hub_settings_take_the_ca_as_pem_text() -> None:
    settings = hub_settings(FULL)

    assert (settings.endpoint.host, settings.endpoint.port, settings.token) == ("10.0.0.1", 4433, "tok")
    assert settings.endpoint.ca_pem == (PEM + "\n").encode()
    assert settings.endpoint.server_name == "localhost"


def test_hub_settings_read_the_ca_from_a_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(PEM + "\n")

    settings = hub_settings({**FULL, "RAYFLOW_HUB_CA": str(ca), "RAYFLOW_HUB_SERVER_NAME": "hub.internal"})

    assert settings.endpoint.ca_pem == (PEM + "\n").encode()
    assert settings.endpoint.server_name == "hub.internal"


def test_hub_settings_name_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        hub_settings({"RAYFLOW_HUB_HOST": "10.0.0.1", "RAYFLOW_HUB_PORT": "4433"})

    assert caught.value.details["missing"] == "RAYFLOW_HUB_CA, RAYFLOW_HUB_TOKEN"


@pytest.mark.parametrize("port", ["hub", "0", "70000"])
def test_hub_settings_refuse_a_bad_port(port: str) -> None:
    with pytest.raises(ConfigError):
        hub_settings({**FULL, "RAYFLOW_HUB_PORT": port})


def test_hub_settings_refuse_a_ca_file_that_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        hub_settings({**FULL, "RAYFLOW_HUB_CA": str(tmp_path / "absent.pem")})
