"""Agents inside sandboxes reach the ReasoningBank over QUIC through ``context.memory``.

A real hub runs in this process on 127.0.0.1; each test creates a sandbox (a plain process, or a
Docker container whose ``hub-only`` network reaches the hub through its bridge's gateway), uploads
a tiny python agent and runs it with ``python -m rayflow.guest run``. What the agent stored is
read back from the hub's bank on the host, and what the host stored is what the agent finds.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from rayflow.hub.background import BackgroundHub
from rayflow.sandbox.backend import Sandbox, SandboxBackend
from rayflow.sandbox.spec import MIB, Limits, NetworkPolicy, SandboxSpec
from rayflow.wire.hub_client import SyncHubClient
from rayflow.wire.memory_records import MemoryItem

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

T = TypeVar("T")
RW = ["reasoningbank:read", "reasoningbank:write"]
NAMESPACE = "swarm/fixes"
WORKDIR = "/workspace"
LIMITS = Limits(cpus=1.0, memory_bytes=512 * MIB, pids=128, disk_bytes=32 * MIB, wall_time_s=300.0)
#: Owner of this module's sandboxes; unique per run so reaping touches only ours.
OWNER = f"test-sandbox-memory-{secrets.token_hex(4)}"

#: The agent uploaded into every sandbox: stores and searches as its task says, returns the ids.
AGENT = '''
"""Uses the shared memory as the task says."""


def solve(context):
    task = context.task
    out = {}
    if "store" in task:
        out["stored"] = context.memory.store_pattern(**task["store"])["id"]
    if "search" in task:
        hits = context.memory.search(task["search"], k=5, namespace=task.get("namespace", ""))
        out["found"] = [hit["item"]["id"] for hit in hits]
    return out
'''


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundHub]:
    with BackgroundHub(tmp_path_factory.mktemp("hub") / "state") as running:
        yield running


def bank_item(hub: BackgroundHub, tenant: str, item_id: str) -> MemoryItem:
    """Read an item straight from the bank, on the hub's loop like the hub's own reads."""

    async def read() -> MemoryItem:
        return hub.server.bank.get(tenant, item_id)

    return hub.call(read())


@pytest.fixture(scope="module")
def host_client(hub: BackgroundHub) -> Iterator[SyncHubClient]:
    """The host's own client (a worker's view), in tenant ``acme``."""
    host, port = hub.address
    token = hub.issue_token("host-worker", "acme", ["*"], RW)
    with SyncHubClient(host, port, ca_pem=hub.ca_pem, token=token) as client:
        yield client


class Backend:
    """One sandbox backend as these tests use it: how to make it, how the hub is reached, which python."""

    def __init__(
        self, name: str, backend: SandboxBackend, python: str, hub_env: Callable[[int], dict[str, str]]
    ):
        self.name = name
        self.backend = backend
        self.python = python
        self.hub_env = hub_env


@pytest.fixture(
    scope="module",
    params=["process", pytest.param("docker", marks=pytest.mark.docker)],
)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    if request.param == "process":
        from rayflow.sandbox.process_backend import ProcessBackend

        process = ProcessBackend(registry_dir=tmp_path_factory.mktemp("registry"))
        # No network isolation here: the sandbox dials the hub's loopback address itself, with
        # this interpreter (the system python3 has no aioquic).
        yield Backend(
            "process",
            process,
            sys.executable,
            lambda port: {"RAYFLOW_HUB_HOST": "127.0.0.1", "RAYFLOW_HUB_PORT": str(port)},
        )
        process.reap(lambda owner: owner != OWNER)
        return
    from rayflow.sandbox.docker_backend import DockerBackend

    docker_client = request.getfixturevalue("docker_client")
    docker = DockerBackend(docker_client)
    docker.ensure_image(SandboxSpec(owner=OWNER).image)
    # The backend sets RAYFLOW_HUB_HOST/PORT to the hub as the container reaches it.
    yield Backend("docker", docker, "python3", lambda port: {})
    docker.reap(lambda owner: owner != OWNER)


@pytest.fixture
def make_sandbox(backend: Backend, hub: BackgroundHub) -> Iterator[Callable[..., Sandbox]]:
    """Creates sandboxes with a ``hub-only`` network and the given hub token (or none)."""
    made: list[Sandbox] = []
    _, port = hub.address

    def make(token: str | None) -> Sandbox:
        env = {"RAYFLOW_HUB_CA": hub.ca_pem.decode(), **backend.hub_env(port)}
        if token is not None:
            env["RAYFLOW_HUB_TOKEN"] = token
        spec = SandboxSpec(
            owner=OWNER,
            limits=LIMITS,
            network=NetworkPolicy.hub_only("127.0.0.1", port),
            env=env,
            exec_timeout_s=120.0,
            workdir=WORKDIR,
        )
        sandbox = backend.backend.create(spec)
        made.append(sandbox)
        sandbox.write_file(f"{WORKDIR}/memory_agent.py", AGENT.encode())
        return sandbox

    yield make
    for sandbox in made:
        sandbox.destroy()


def run_agent(backend: Backend, sandbox: Sandbox, task: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Run the uploaded agent on ``task`` with the in-sandbox runner; (exit code, result object)."""
    spec = {"agent": {"kind": "python", "target": "memory_agent:solve"}, "task": task}
    sandbox.write_file(f"{WORKDIR}/spec.json", json.dumps(spec).encode())
    # `python -m` puts the working directory on sys.path, so the uploaded module imports.
    result = sandbox.exec(
        [backend.python, "-m", "rayflow.guest", "run", "spec.json"], cwd=WORKDIR, timeout_s=120
    )
    assert result.killed is None, result.stderr.decode(errors="replace")
    return result.exit_code, json.loads(result.stdout)


def test_what_an_agent_stores_lands_in_the_hubs_bank(
    backend: Backend, hub: BackgroundHub, make_sandbox: Callable[..., Sandbox]
) -> None:
    token = hub.issue_token("agent-7", "acme", [f"{NAMESPACE}/*", NAMESPACE], RW)
    sandbox = make_sandbox(token)
    title = f"Retry flaky fetches ({backend.name})"

    code, result = run_agent(
        backend,
        sandbox,
        {
            "store": {
                "namespace": NAMESPACE,
                "title": title,
                "content": "wrap network fetches in a bounded retry",
            }
        },
    )

    assert code == 0 and result["ok"], result
    item = bank_item(hub, "acme", result["value"]["stored"])
    assert (item.title, item.namespace, item.source_agent) == (title, NAMESPACE, "agent-7")


def test_an_agent_finds_what_the_host_stored(
    backend: Backend, hub: BackgroundHub, host_client: SyncHubClient, make_sandbox: Callable[..., Sandbox]
) -> None:
    stored = host_client.store_pattern(
        namespace=NAMESPACE,
        title=f"Enable WAL mode ({backend.name})",
        content="sqlite database is locked under concurrent writers: enable WAL journal mode",
    )
    sandbox = make_sandbox(hub.issue_token("agent-8", "acme", [f"{NAMESPACE}/*", NAMESPACE], RW))

    code, result = run_agent(backend, sandbox, {"search": "database is locked", "namespace": NAMESPACE})

    assert code == 0 and result["ok"], result
    assert stored["id"] in result["value"]["found"]


def test_a_token_of_another_tenant_sees_nothing(
    backend: Backend, hub: BackgroundHub, host_client: SyncHubClient, make_sandbox: Callable[..., Sandbox]
) -> None:
    host_client.store_pattern(
        namespace=NAMESPACE,
        title=f"Acme deploy day ({backend.name})",
        content="acme deploys the payment service on tuesdays",
    )
    sandbox = make_sandbox(hub.issue_token("intruder", "globex", ["*"], RW))

    code, result = run_agent(backend, sandbox, {"search": "acme deploys the payment service on tuesdays"})

    assert code == 0 and result["ok"], result
    assert result["value"]["found"] == []


def test_a_sandbox_without_a_token_gets_a_config_error_result(
    backend: Backend, make_sandbox: Callable[..., Sandbox]
) -> None:
    sandbox = make_sandbox(None)

    code, result = run_agent(backend, sandbox, {"search": "anything"})

    assert code == 1
    assert result["ok"] is False
    assert result["error"]["code"] == "config_error"
    assert "RAYFLOW_HUB_TOKEN" in result["error"]["message"]
