"""The op table is the one declaration of every hub op: service, client and docs all follow it."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from rayflow.errors import UnknownOperationError
from rayflow.hub.service import HubService
from rayflow.wire import hub_ops
from rayflow.wire.hub_client import _HubOps
from rayflow.wire.hub_ops import OPS, OpInfo, describe_ops, format_ops_markdown
from rayflow.wire.op_schema import Arg, optional

DOCS = Path(__file__).resolve().parents[2] / "docs" / "hub-ops.md"
REGENERATE = "python -m rayflow.wire.hub_ops > docs/hub-ops.md"


def _keyword_parameters(function: Any, *skip: str) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(function).parameters
    return {name: p for name, p in parameters.items() if name not in ("self", *skip)}


class RecordingTransport:
    """Stands in for the RPC client: records what would be sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], bool]] = []

    def call(self, op: str, args: dict[str, Any], *, token: str, timeout_s: float | None,
             idempotent: bool) -> Any:
        self.calls.append((op, args, idempotent))
        return None


def recording_client() -> tuple[_HubOps, RecordingTransport]:
    client = _HubOps()
    client._transport = RecordingTransport()
    client.token = "tok"
    client.timeout_s = 1.0
    return client, client._transport


# --- the service ------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_every_op_has_a_service_method_taking_exactly_its_arguments(op: str) -> None:
    method = getattr(HubService, op, None)

    assert method is not None, f"HubService has no method {op!r}"
    assert set(_keyword_parameters(method, "claims")) == set(OPS[op].args)


@pytest.mark.parametrize("op", list(OPS))
def test_a_service_method_has_a_default_exactly_for_the_optional_arguments(op: str) -> None:
    parameters = _keyword_parameters(getattr(HubService, op), "claims")

    without_default = {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}
    assert without_default == set(OPS[op].required)


# --- the client -------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_every_op_has_a_client_method_taking_exactly_its_argument_names(op: str) -> None:
    method = getattr(_HubOps, op, None)

    assert method is not None, f"the hub client has no method {op!r}"
    assert set(_keyword_parameters(method)) == set(OPS[op].args)


@pytest.mark.parametrize("op", list(OPS))
def test_a_client_method_requires_exactly_the_required_arguments(op: str) -> None:
    parameters = _keyword_parameters(getattr(_HubOps, op))

    without_default = {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}
    assert without_default == set(OPS[op].required)


def test_the_client_refuses_an_op_that_is_not_in_the_table() -> None:
    client, transport = recording_client()

    with pytest.raises(UnknownOperationError):
        client._call("drop_everything")
    assert transport.calls == []


@pytest.mark.parametrize("op", ["health", "stats", "consolidate"])
def test_the_client_marks_a_call_idempotent_as_the_table_says(op: str) -> None:
    client, transport = recording_client()

    getattr(client, op)()

    assert transport.calls[0][2] is OPS[op].idempotent


def test_the_client_leaves_out_arguments_that_are_not_given() -> None:
    client, transport = recording_client()

    client.store_pattern(namespace="n", title="t", content="c")

    assert transport.calls == [("store_pattern", {"namespace": "n", "title": "t", "content": "c"}, False)]


def test_the_client_searches_by_an_embedding_given_by_keyword() -> None:
    client, transport = recording_client()

    client.search(embedding=[0.5, 1.0], k=2)

    op, args, _ = transport.calls[0]
    assert (op, args) == ("search", {"embedding": struct.pack("<2f", 0.5, 1.0), "k": 2, "namespace": ""})


def test_the_client_takes_a_non_text_query_as_an_embedding() -> None:
    client, transport = recording_client()

    client.search([0.5, 1.0])

    assert "query" not in transport.calls[0][1]
    assert transport.calls[0][1]["embedding"] == struct.pack("<2f", 0.5, 1.0)


# --- the table itself -------------------------------------------------------------------------
def test_a_bare_type_in_the_table_is_a_required_argument() -> None:
    info = OpInfo(hub_ops.READ, True, "x", {"id": str, "k": optional(int)})

    assert info.args["id"] == Arg(str)
    assert info.required == ("id",)


def test_an_ops_arguments_cannot_be_changed_after_declaration() -> None:
    with pytest.raises(TypeError):
        OPS["get"].args["extra"] = Arg(str)  # type: ignore[index]


def test_the_table_cannot_gain_an_op_at_run_time() -> None:
    with pytest.raises(TypeError):
        OPS["drop_everything"] = OPS["get"]  # type: ignore[index]


@pytest.mark.parametrize("op", list(OPS))
def test_every_op_has_a_one_line_description(op: str) -> None:
    summary = OPS[op].summary

    assert summary.strip() and "\n" not in summary


def test_describe_ops_gives_one_row_per_op_in_table_order() -> None:
    assert [row["op"] for row in describe_ops()] == list(OPS)


def test_describe_ops_gives_each_argument_as_name_types_and_requiredness() -> None:
    revoke = next(row for row in describe_ops() if row["op"] == "revoke")

    assert revoke["args"] == [
        {"name": "jti", "types": ["str"], "required": True},
        {"name": "expires_at", "types": ["int", "float"], "required": True},
        {"name": "reason", "types": ["str"], "required": False},
    ]


def test_describe_ops_rows_are_json_ready() -> None:
    rows = describe_ops()

    assert json.loads(json.dumps(rows)) == rows


# --- the docs ---------------------------------------------------------------------------------
def test_the_reference_page_of_ops_is_up_to_date() -> None:
    assert DOCS.exists(), f"docs/hub-ops.md is missing; generate it with: {REGENERATE}"
    stale = f"docs/hub-ops.md is out of date; regenerate it with: {REGENERATE}"
    assert DOCS.read_text() == format_ops_markdown(), stale


def test_the_reference_page_has_a_row_for_every_op() -> None:
    page = format_ops_markdown()

    assert all(f"| `{op}` |" in page for op in OPS)
