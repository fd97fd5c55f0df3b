"""The fixing agent through the real runner, against a real ReasoningBank hub over QUIC on 127.0.0.1.

A generated codebase is fixed module by module with ``rayflow.guest.agents.fixer:fix_module``: once with
memory off (the control), then twice with memory on against one hub, each pass on a fresh copy of
the same broken codebase. The second pass must need fewer attempts than the control because the
first one stored what worked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayflow.guest.agents.signature import parse_unittest_output, signature_of
from rayflow.guest.runner import run_spec
from rayflow.hub.background import BackgroundHub
from rayflow.jobs.demo_codebase import DEFECTS, ModuleInfo, generate_codebase, write_module, write_package

pytestmark = pytest.mark.integration

AGENT = {"kind": "python", "target": "rayflow.guest.agents.fixer:fix_module"}
MODULES = 20


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[BackgroundHub]:
    with BackgroundHub(tmp_path_factory.mktemp("hub")) as running:
        yield running


def hub_env(hub: BackgroundHub, namespace: str) -> dict[str, str]:
    return hub.sandbox_env(hub.issue_token("fixer", "demo", [f"{namespace}/*", namespace]))


@pytest.fixture(scope="module")
def codebase(tmp_path_factory) -> tuple[Path, list[ModuleInfo]]:
    root = tmp_path_factory.mktemp("pristine")
    return root, generate_codebase(root, MODULES, seed=11)


def fix_pass(pristine: Path, work: Path, modules: list[ModuleInfo], **task: Any) -> list[dict[str, Any]]:
    """Fix every module of a fresh copy of ``pristine`` through the runner; the agents' values."""
    shutil.copytree(pristine, work)
    values = []
    for module in modules:
        result = run_spec({"agent": AGENT, "task": {**module.task(), **task}, "workdir": str(work)})
        assert result["ok"], result["error"]
        values.append(result["value"])
    return values


def attempts(values: list[dict[str, Any]]) -> int:
    return sum(v["attempts"] for v in values)


def test_memory_off_fixes_every_module_without_touching_memory(codebase, tmp_path, monkeypatch):
    pristine, modules = codebase
    for name in ("RAYFLOW_HUB_HOST", "RAYFLOW_HUB_PORT", "RAYFLOW_HUB_CA", "RAYFLOW_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    values = fix_pass(pristine, tmp_path / "work", modules, memory=False)
    assert all(v["passed"] for v in values)
    assert [v["strategy"] for v in values] == [m.strategy for m in modules]
    # Any use of memory without a configured hub would have been recorded as a memory error.
    assert all(v["memory_errors"] == [] and v["memory_hits"] == 0 for v in values)
    for module in modules:
        result = subprocess.run(
            [sys.executable, "-B", "-m", "unittest", module.test],
            check=False,
            cwd=tmp_path / "work",
            capture_output=True,
        )
        assert result.returncode == 0


def test_a_second_pass_with_memory_needs_fewer_attempts_than_memory_off(codebase, hub, tmp_path, monkeypatch):
    pristine, modules = codebase
    control = fix_pass(pristine, tmp_path / "off", modules, memory=False)
    for name, value in hub_env(hub, "swarm/learn").items():
        monkeypatch.setenv(name, value)
    first = fix_pass(pristine, tmp_path / "run1", modules, memory=True, namespace="swarm/learn")
    second = fix_pass(pristine, tmp_path / "run2", modules, memory=True, namespace="swarm/learn")
    assert all(v["passed"] for v in control + first + second)
    assert all(v["memory_errors"] == [] for v in first + second)
    assert attempts(second) < attempts(control)
    assert attempts(second) == len(modules)  # every module fixed by its first attempt
    assert sum(v["memory_hits"] for v in second) >= len(modules)
    stored = [v["stored_id"] for v in first if v["stored_id"]]
    assert stored and not any(v["stored_id"] for v in second)
    bank = hub.server.bank
    for item_id in stored:
        item = bank.get("demo", item_id)
        assert item.namespace == "swarm/learn" and item.domain == "python-fix"
        assert any(tag.startswith("strategy:") for tag in item.tags)
        assert any(tag.startswith("sig:") for tag in item.tags)
    assert sum(bank.get("demo", item_id).successes for item_id in stored) >= len(modules)


def test_a_misleading_memory_is_tried_first_reported_as_failed_and_replaced(hub, tmp_path, monkeypatch):
    defect = next(d for d in DEFECTS if d.strategy == "reverse_sort")
    write_package(tmp_path)
    info = write_module(tmp_path, "mod_000", defect, [defect.snippet])
    output = subprocess.run(
        [sys.executable, "-B", "-m", "unittest", info.test],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stderr
    signature = signature_of(parse_unittest_output(output)[0])
    bank = hub.server.bank
    if not bank.has_tenant("demo"):
        bank.create_tenant("demo")
    misleading = bank.store_item(
        "demo",
        namespace="swarm/misled",
        title="widen_upper_bound fixes it",
        content=f"Failure: {signature.text}\nFix: widen_upper_bound",
        tags=["strategy:widen_upper_bound", f"sig:{signature.digest}"],
        domain="python-fix",
    )
    for name, value in hub_env(hub, "swarm/misled").items():
        monkeypatch.setenv(name, value)
    result = run_spec(
        {
            "agent": AGENT,
            "task": {**info.task(), "memory": True, "namespace": "swarm/misled"},
            "workdir": str(tmp_path),
        }
    )
    value = result["value"]
    assert value["passed"] and value["strategy"] == "reverse_sort"
    assert value["tried"][0]["strategy"] == "widen_upper_bound" and value["tried"][0]["from_memory"]
    assert bank.get("demo", misleading.id).failures == 1
    replacement = bank.get("demo", value["stored_id"])
    assert "strategy:reverse_sort" in replacement.tags and f"sig:{signature.digest}" in replacement.tags
