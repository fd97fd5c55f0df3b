"""Jobs are validated at construction; decompositions give stable subtasks; runner output is parsed."""

from __future__ import annotations

import pytest

from rayflow.errors import ConfigError, SandboxError
from rayflow.sandbox.spec import ExecResult, KillReason, NetworkMode
from rayflow.swarm.job import (
    AgentRef,
    FileGlob,
    FunctionDecomposition,
    Job,
    TaskList,
    decomposition_to_wire,
    subtask_result_namespace,
    subtasks_of,
)
from rayflow.swarm.worker_core import (
    WorkerPlan,
    agent_launcher_argv,
    parse_runner_output,
    result_from_run,
)
from rayflow.wire.hub_endpoint import HubEndpoint
from rayflow.wire.subtasks import Subtask


def three_tasks(job_task):
    return [{"n": i} for i in range(3)]


def test_a_job_gets_a_valid_generated_name():
    job = Job(AgentRef.shell("true"), TaskList([{}]))
    assert job.name.startswith("job-") and job.results_namespace == f"swarm/{job.name}"


@pytest.mark.parametrize("name", ["Upper", "has space", "-lead", "x" * 80])
def test_a_job_name_that_is_no_namespace_segment_is_refused(name):
    with pytest.raises(ConfigError):
        Job(AgentRef.shell("true"), TaskList([{}]), name=name)


def test_pattern_b_refuses_an_unnamed_decomposition_function():
    with pytest.raises(ConfigError, match="module:function"):
        Job(AgentRef.shell("true"), FunctionDecomposition(three_tasks), pattern="B")


def test_an_agent_needs_its_command_or_target():
    with pytest.raises(ConfigError):
        AgentRef("shell")
    with pytest.raises(ConfigError):
        AgentRef("python", target="no_colon")


def test_subtask_ids_are_stable_and_a_payload_id_is_kept():
    job = Job(AgentRef.shell("true"), TaskList([{"x": 1}, {"id": "mine"}]), name="j")
    assert [s.id for s in subtasks_of(job)] == ["j-00000", "mine"]


def test_a_glob_lists_matching_files_sorted_and_skips_hidden_directories(tmp_path):
    for name in ("b.py", "a.py", "sub/c.py", ".git/d.py", "e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    job = Job(AgentRef.shell("true"), FileGlob(str(tmp_path), "**/*.py", {"k": 1}), name="g")
    assert [s.task for s in subtasks_of(job)] == [
        {"path": "a.py", "k": 1}, {"path": "b.py", "k": 1}, {"path": "sub/c.py", "k": 1}
    ]
    assert job.upload == str(tmp_path.resolve())


def test_a_function_decomposition_runs_the_function():
    job = Job(AgentRef.shell("true"), FunctionDecomposition(three_tasks), name="f")
    assert [s.task["n"] for s in subtasks_of(job)] == [0, 1, 2]


def test_the_wire_form_names_the_decomposition():
    assert decomposition_to_wire(TaskList([{"a": 1}])) == {"kind": "list", "tasks": [{"a": 1}]}
    assert decomposition_to_wire(FunctionDecomposition("m:f")) == {"kind": "function", "target": "m:f"}


def test_result_namespaces_are_valid_and_distinct_for_ids_that_differ_in_case():
    a = subtask_result_namespace("swarm/j", "Mod_A")
    b = subtask_result_namespace("swarm/j", "mod_a")
    assert a != b and a.startswith("swarm/j/results/")


def test_worker_tokens_cover_the_results_subtree_and_the_shared_memory():
    job = Job(AgentRef.shell("true"), TaskList([{}]), name="t", memory_namespaces=("lessons/*",))
    assert job.token_namespaces() == ["swarm/t/*", "lessons/*"]


def test_isolation_defaults_to_one_sandbox_per_worker_and_is_carried_in_the_plan():
    assert Job(AgentRef.shell("true"), TaskList([{}])).isolation == "worker"
    job = Job(AgentRef.shell("true"), TaskList([{}]), name="t", tenant="acme", isolation="subtask")
    plan = WorkerPlan.for_job(job, None)
    assert (plan.isolation, plan.tenant) == ("subtask", "acme")


def test_the_coordinators_own_sandbox_keeps_one_sandbox_whatever_the_jobs_isolation():
    from rayflow.swarm.coordinator_core import step_plan_for

    job = Job(AgentRef.shell("true"), TaskList([{}]), name="t", isolation="subtask")
    assert step_plan_for(WorkerPlan.for_job(job, None)).isolation == "worker"


@pytest.mark.parametrize("isolation", ["process", "", "Subtask", None])
def test_an_unknown_isolation_is_refused(isolation):
    with pytest.raises(ConfigError, match="isolation"):
        Job(AgentRef.shell("true"), TaskList([{}]), isolation=isolation)


def test_a_plan_with_a_hub_and_extra_endpoints_allows_both():
    job = Job(AgentRef.shell("true"), TaskList([{}]), name="t", allow=(("127.0.0.1", 9000),))
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    plan = WorkerPlan.for_job(job, HubEndpoint("127.0.0.1", 4433, pem))
    assert plan.spec.network.mode is NetworkMode.ALLOW_LIST
    assert plan.spec.network.hub.port == 4433
    assert plan.spec.env["RAYFLOW_HUB_CA"] == pem.decode()


def test_the_launcher_uses_the_runtimes_interpreter_and_path():
    argv = agent_launcher_argv({"python": "/usr/bin/python3", "path": ["/lib/x"]}, "run", "spec.json")
    assert argv[0] == "/usr/bin/python3" and "'/lib/x'" in argv[4] and argv[-2:] == ["run", "spec.json"]


def test_the_runner_result_is_the_last_json_line():
    out = b'noise\n{"ok": true, "value": 1}\n'
    assert parse_runner_output(out) == {"ok": True, "value": 1}
    assert parse_runner_output(b"no json here") is None


def test_a_runner_that_gave_nothing_is_a_sandbox_failure():
    outcome = ExecResult(1, b"", b"Traceback", 0.1)
    with pytest.raises(SandboxError):
        result_from_run(Subtask("s", 0), outcome, 0.0, 1.0)


def test_a_killed_runner_becomes_a_failed_result_with_the_reason():
    outcome = ExecResult(137, b"", b"", 0.1, killed=KillReason.TIMEOUT)
    result = result_from_run(Subtask("s", 0), outcome, 0.0, 1.0)
    assert not result.ok and result.error["code"] == "killed_timeout"
