"""The ``rayflow`` command, run as a real subprocess against a state directory on disk."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def rayflow(state_dir, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_memory_commands_round_trip(tmp_path):
    rayflow(tmp_path, "memory", "tenant-add", "acme")
    item_id = rayflow(
        tmp_path,
        "memory",
        "add",
        "--tenant",
        "acme",
        "--namespace",
        "swarm/cli",
        "--title",
        "Use WAL mode",
        "--content",
        "sqlite database is locked: enable WAL and a busy timeout",
        "--tag",
        "sqlite",
    ).stdout.strip()
    found = json.loads(
        rayflow(tmp_path, "memory", "search", "database is locked", "--tenant", "acme", "--json").stdout
    )
    assert found[0]["id"] == item_id
    assert {"similarity", "recency", "reliability", "score"} <= found[0].keys()
    table = rayflow(tmp_path, "memory", "search", "database is locked", "--tenant", "acme").stdout
    assert "similarity" in table and "Use WAL mode" in table
    shown = rayflow(tmp_path, "memory", "show", item_id, "--tenant", "acme").stdout
    assert "enable WAL" in shown and "reliability 0.500" in shown
    stats = rayflow(tmp_path, "memory", "stats", "--tenant", "acme").stdout
    assert "items" in stats
    assert "merged 0" in rayflow(tmp_path, "memory", "consolidate", "--tenant", "acme").stdout


def test_typed_errors_become_one_line_and_exit_code_2(tmp_path):
    proc = rayflow(tmp_path, "memory", "search", "anything", "--tenant", "nobody", check=False)
    assert proc.returncode == 2
    assert "[unknown_tenant]" in proc.stderr and "Traceback" not in proc.stderr
    rayflow(tmp_path, "memory", "tenant-add", "acme")
    proc = rayflow(
        tmp_path, "memory", "add", "--tenant", "acme", "--title", " ", "--content", "x", check=False
    )
    assert proc.returncode == 2 and "[empty_text]" in proc.stderr


def test_broken_config_is_reported_not_crashed(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", "memory", "tenants", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAYFLOW_MEMORY_MMR_LAMBDA": "lots"},
    )
    assert proc.returncode == 2 and "[config_error]" in proc.stderr


def test_demo_job_runs_end_to_end(tmp_path):
    plot = tmp_path / "plot.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayflow",
            "demo",
            "--memory-only",
            "--state-dir",
            str(tmp_path / "state"),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "on disk: False" in proc.stdout
    assert "top result unchanged: True" in proc.stdout
    assert plot.stat().st_size > 10_000


def test_sandbox_gc_command_runs_and_reports(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", "sandbox", "gc", "--backend", "process"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "removed" in proc.stdout


def hub_ops_command(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", "hub", "ops", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_hub_ops_as_json_are_the_op_tables_rows():
    from rayflow.wire.hub_ops import describe_ops

    assert json.loads(hub_ops_command("--json")) == describe_ops()


def test_hub_ops_table_lists_every_op_with_its_scope():
    from rayflow.wire.hub_ops import OPS

    lines = hub_ops_command().splitlines()
    for op, info in OPS.items():
        assert any(f" {op} " in line and info.scope in line for line in lines), op
