"""The agent host's pure parts: requests, replies, the launcher's conclusions and argv."""

from __future__ import annotations

import json

import pytest

from rayflow.errors import InvalidInputError, OverloadedError
from rayflow.guest import host_launcher
from rayflow.guest.agent_host import (
    HUB_CLIENT_MODULE,
    RUNNER_MODULE,
    PingRequest,
    RunRequest,
    encode_reply,
    error_reply,
    exit_fields,
    modules_to_preload,
    parse_preload,
    parse_request,
    spec_timeout,
)
from rayflow.swarm.job import AgentRef
from rayflow.swarm.worker_core import agent_host_argv, agent_launcher_argv, host_launcher_argv
from rayflow.wire.framing import FrameSplitter
from rayflow.wire.guest_commands import AGENT_HOST_SOCKET, runtime_argv

IDENTITY = {"python": "/usr/bin/python3", "path": ["/opt/site"]}


def run_body(**fields: object) -> bytes:
    return json.dumps({"kind": "run", "spec": "s.json", "cwd": "/work", "env": {"A": "1"}, **fields}).encode()


# --- requests ------------------------------------------------------------------------------------
def test_a_ping_request_parses() -> None:
    assert parse_request(b'{"kind": "ping"}') == PingRequest()


def test_a_run_request_resolves_its_spec_against_its_cwd() -> None:
    assert parse_request(run_body()) == RunRequest("/work/s.json", {"A": "1"}, "/work")


def test_a_run_request_keeps_an_absolute_spec_path() -> None:
    assert parse_request(run_body(spec="/elsewhere/s.json")).spec == "/elsewhere/s.json"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"kind": "format-disk"}',
        run_body(cwd="relative"),
        run_body(spec=""),
        run_body(env={"A": 1}),
        run_body(env={"A=B": "1"}),
        run_body(env=["A"]),
    ],
    ids=[
        "garbage",
        "not-an-object",
        "unknown-kind",
        "relative-cwd",
        "empty-spec",
        "number-value",
        "equals-in-name",
        "env-list",
    ],
)
def test_a_malformed_request_is_an_invalid_input_error(body: bytes) -> None:
    with pytest.raises(InvalidInputError):
        parse_request(body)


def test_an_error_reply_carries_the_errors_code_and_message() -> None:
    (body,) = FrameSplitter(1 << 20).feed(error_reply(OverloadedError("busy")))
    assert json.loads(body) == {"kind": "error", "error": {"code": "overloaded", "message": "busy"}}


# --- exits, timeouts, preloads -------------------------------------------------------------------
def test_exit_fields_of_a_normal_exit() -> None:
    assert exit_fields(3, None) == {"exit_code": 3, "signal": None, "killed": None}


def test_exit_fields_of_a_death_by_signal() -> None:
    assert exit_fields(-9, "timeout") == {"exit_code": None, "signal": 9, "killed": "timeout"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(30, 30.0), (0.5, 0.5), (0, None), (-1, None), ("30", None), (True, None), (None, None)],
)
def test_spec_timeout_is_a_positive_number_or_none(value: object, expected: float | None) -> None:
    assert spec_timeout({"timeout_s": value}) == expected


def test_the_hub_client_is_preloaded_only_with_hub_settings() -> None:
    assert modules_to_preload({}, []) == [RUNNER_MODULE]
    assert modules_to_preload({"RAYFLOW_HUB_HOST": "10.0.0.1"}, []) == [RUNNER_MODULE, HUB_CLIENT_MODULE]


def test_extra_preloads_come_after_the_runtimes_own_without_repeats() -> None:
    names = modules_to_preload({}, ["a.b", RUNNER_MODULE, "a.b", "c"])
    assert names == [RUNNER_MODULE, "a.b", "c"]


def test_parse_preload_splits_on_commas_and_drops_blanks() -> None:
    assert parse_preload(" a.b, ,c ") == ["a.b", "c"]
    assert parse_preload(None) == []


# --- the launcher's frames -----------------------------------------------------------------------
def test_the_launchers_frames_are_the_framing_modules_frames() -> None:
    message = {"kind": "run", "env": {"TOKEN": "x" * 70_000}}
    (body,) = FrameSplitter(1 << 20).feed(host_launcher.encode(message))
    assert json.loads(body) == message


def test_the_launcher_reads_the_hosts_replies_in_order_and_keeps_a_partial_one() -> None:
    data = encode_reply("result", result={"ok": True}) + encode_reply("exit", exit_code=0)
    buffer = bytearray(data[:-3])
    assert host_launcher.split_frames(buffer) == [{"kind": "result", "result": {"ok": True}}]
    buffer += data[-3:]
    assert host_launcher.split_frames(buffer) == [{"kind": "exit", "exit_code": 0}]
    assert buffer == bytearray()


def test_the_launcher_refuses_an_oversized_reply_from_its_header() -> None:
    buffer = bytearray(host_launcher.HEADER.pack(host_launcher.MAX_REPLY_BYTES + 1))
    with pytest.raises(ValueError):
        host_launcher.split_frames(buffer)


# --- the launcher's conclusions ------------------------------------------------------------------
def result(ok: bool) -> dict[str, object]:
    return {"kind": "result", "result": {"ok": ok, "value": 1}}


def exit_reply(
    code: int | None = 0, signal: int | None = None, killed: str | None = None
) -> dict[str, object]:
    return {"kind": "exit", "exit_code": code, "signal": signal, "killed": killed}


def test_a_successful_result_is_printed_and_exits_zero() -> None:
    outcome = host_launcher.conclude([result(True), exit_reply(0)])
    assert json.loads(outcome.stdout or "") == {"ok": True, "value": 1}
    assert (outcome.exit_code, outcome.signal, outcome.fall_back) == (0, None, None)


def test_a_failed_result_is_printed_and_exits_one() -> None:
    outcome = host_launcher.conclude([result(False), exit_reply(1)])
    assert outcome.stdout is not None and outcome.exit_code == 1


def test_a_result_counts_even_when_the_host_did_not_report_the_exit() -> None:
    assert host_launcher.conclude([result(True)]).exit_code == 0


def test_a_child_killed_for_its_timeout_gives_a_deadline_result() -> None:
    outcome = host_launcher.conclude([exit_reply(None, 9, "timeout")])
    assert json.loads(outcome.stdout or "")["error"]["code"] == "deadline_exceeded"
    assert outcome.exit_code == 1


def test_a_child_killed_by_a_signal_makes_the_launcher_die_by_it() -> None:
    outcome = host_launcher.conclude([exit_reply(None, 9)])
    assert (outcome.stdout, outcome.signal, outcome.exit_code) == (None, 9, 137)


def test_a_child_that_crashed_without_a_result_passes_on_its_exit_code() -> None:
    outcome = host_launcher.conclude([exit_reply(3)])
    assert (outcome.stdout, outcome.exit_code) == (None, 3)
    assert outcome.note


def test_a_connection_closed_without_anything_is_a_failure_with_a_note() -> None:
    outcome = host_launcher.conclude([])
    assert outcome.stdout is None and outcome.exit_code == host_launcher.EXIT_NO_RESULT and outcome.note


def test_a_refused_request_falls_back_to_running_without_the_host() -> None:
    outcome = host_launcher.conclude([{"kind": "error", "error": {"code": "overloaded", "message": "busy"}}])
    assert outcome.fall_back is not None and "busy" in outcome.fall_back


# --- argv ------------------------------------------------------------------------------------------
def test_the_launcher_runs_isolated_and_appends_the_runtimes_guest_and_wire_directories() -> None:
    argv = host_launcher_argv(IDENTITY, "run", "spec.json")
    assert argv[:4] == ["/usr/bin/python3", "-I", "-S", "-c"]
    assert "sys.path += [p + '/' + d for p in P for d in ('rayflow/guest', 'rayflow/wire')]" in argv[4]
    assert argv[5:] == [AGENT_HOST_SOCKET, "run", "spec.json"]


def test_the_fallback_argv_is_the_runners_own() -> None:
    assert runtime_argv("/usr/bin/python3", ["/opt/site"], "run", "s") == agent_launcher_argv(
        IDENTITY, "run", "s"
    )


def test_the_host_preloads_a_python_agent_of_the_runtime() -> None:
    argv = agent_host_argv(IDENTITY, AgentRef.python("rayflow.guest.agents.model_call:answer"))
    assert argv[5:] == [
        "host",
        "--socket",
        AGENT_HOST_SOCKET,
        "--detach",
        "--preload",
        "rayflow.guest.agents.model_call",
    ]


def test_the_host_does_not_preload_an_uploaded_agent_module() -> None:
    argv = agent_host_argv(IDENTITY, AgentRef.python("my_agents.fix:solve"))
    assert "--preload" not in argv


def test_the_host_of_a_shell_agent_preloads_nothing_extra() -> None:
    assert "--preload" not in agent_host_argv(IDENTITY, AgentRef.shell("make test"))
