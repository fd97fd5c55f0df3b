"""The hub's op table: the one declaration of every op the hub serves.

Each op is declared here once, with its name, the token scope it needs, whether a replay of it is
harmless (so it may arrive as 0-RTT early data), its keyword arguments (names, accepted types,
required or optional) and a one-line description. Everything else follows from this table:

* the server (:class:`rayflow.hub.server.HubServer`) registers every op with its argument schema
  and runs it with the :class:`~rayflow.hub.service.HubService` method of the same name, whose
  keyword parameters are exactly the schema's names (a unit test holds both to that);
* the client (:mod:`rayflow.wire.hub_client`) has one method per op, with the same keyword names,
  and refuses to send an op that is not in the table;
* the reference of ops (``docs/hub-ops.md`` and ``rayflow hub ops``) is produced by
  :func:`describe_ops` / :func:`format_ops_markdown`; regenerate the page with
  ``python -m rayflow.wire.hub_ops > docs/hub-ops.md``.

It lives apart from the service because the client runs inside sandbox images that carry neither
the bank nor the token machinery: this module imports nothing but the standard library and the
wall's own argument schema. That is also why the scopes are written out here as the plain strings
tokens carry rather than taken from :class:`rayflow.auth.claims.Scope` (importing ``rayflow.auth``
loads the signing and revocation code); a unit test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from rayflow.wire.op_schema import Arg, optional

#: The scope strings a token carries (the same values as :class:`rayflow.auth.claims.Scope`).
READ = "reasoningbank:read"
WRITE = "reasoningbank:write"
ADMIN = "admin"


@dataclass(frozen=True)
class OpInfo:
    """One op: the scope it needs, whether a replay of it is harmless, what it does, its arguments.

    ``args`` maps each keyword argument's name to an :class:`~rayflow.wire.op_schema.Arg` (a bare
    type, or tuple of types, means a required argument); it is kept read-only.
    """

    scope: str
    idempotent: bool
    summary: str
    args: Mapping[str, Arg] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec: dict[str, Arg] = {}
        for name, kind in self.args.items():
            if not name.isidentifier() or name in ("ctx", "claims", "self"):
                raise ValueError(f"argument name {name!r} is not usable as a keyword")
            spec[name] = kind if isinstance(kind, Arg) else Arg(kind)
        object.__setattr__(self, "args", MappingProxyType(spec))

    @property
    def required(self) -> tuple[str, ...]:
        """Names of the arguments a call must give."""
        return tuple(name for name, arg in self.args.items() if arg.required)


_NUMBER = (int, float)

#: Every op the hub serves. Idempotent ops may arrive as 0-RTT early data; the others never do.
OPS: Mapping[str, OpInfo] = MappingProxyType(
    {
        "health": OpInfo(
            READ, True, "Liveness and identity of the replica: version, replica id, region, uptime."
        ),
        "stats": OpInfo(READ, True, "Counts and health figures of the caller's tenant."),
        "search": OpInfo(
            READ,
            True,
            "The k best items under a namespace prefix, for a text query or an embedding (exactly one of"
            " them), with every component of each score.",
            {
                "query": optional(str),
                "embedding": optional(bytes),
                "k": optional(int),
                "namespace": optional(str),
                "domain": optional(str),
                "outcome": optional(str),
                "min_confidence": optional(_NUMBER),
                "mmr_lambda": optional(_NUMBER),
            },
        ),
        "get": OpInfo(
            READ, True, "One item by id; an item outside the token's namespaces is not found.", {"id": str}
        ),
        "store_pattern": OpInfo(
            WRITE,
            False,
            "Store a strategy or lesson as a new item in a namespace; returns its id.",
            {
                "namespace": str,
                "title": str,
                "content": str,
                "description": optional(str),
                "tags": optional(list),
                "domain": optional(str),
                "outcome": optional(str),
                "confidence": optional(_NUMBER),
                "source_task": optional(str),
                "embedding": optional(bytes),
            },
        ),
        "edit_item": OpInfo(
            WRITE,
            False,
            "Change an item's text or tags (what is not given stays); reconciles concurrent versions.",
            {
                "id": str,
                "title": optional(str),
                "description": optional(str),
                "content": optional(str),
                "tags": optional(list),
            },
        ),
        "record_trajectory": OpInfo(
            WRITE,
            False,
            "Judge, distill and store a finished task's trajectory, crediting the items it used.",
            {"trajectory": dict},
        ),
        "report_outcome": OpInfo(
            WRITE,
            False,
            "Report that items were used in a task that succeeded or failed (this moves their reliability).",
            {"item_ids": list, "success": bool},
        ),
        "consolidate": OpInfo(
            ADMIN,
            False,
            "Merge duplicates, link contradictions and prune stale items of the tenant (full: compare all).",
            {"full": optional(bool)},
        ),
        "revoke": OpInfo(
            ADMIN,
            False,
            "Put a token (by its jti) on the hub's deny-list until it expires.",
            {"jti": str, "expires_at": _NUMBER, "reason": optional(str)},
        ),
        "issue_token": OpInfo(
            ADMIN,
            False,
            "Mint a token for the admin's own tenant, never wider than the admin's namespaces.",
            {"sub": str, "namespaces": list, "scopes": list, "ttl_s": optional(int)},
        ),
    }
)


def describe_ops() -> list[dict[str, Any]]:
    """The op table as plain rows (JSON-ready), in table order: the source of every reference of ops."""
    return [
        {
            "op": name,
            "scope": info.scope,
            "idempotent": info.idempotent,
            "args": [
                {"name": arg_name, "types": list(arg.type_names), "required": arg.required}
                for arg_name, arg in info.args.items()
            ],
            "summary": info.summary,
        }
        for name, info in OPS.items()
    ]


def format_args(args: list[dict[str, Any]]) -> str:
    """One row's arguments as ``name: type`` (``name?`` when optional; ``a or b`` for a choice of types)."""
    return ", ".join(
        f"{arg['name']}{'' if arg['required'] else '?'}: {' or '.join(arg['types'])}" for arg in args
    )


def format_ops_markdown() -> str:
    """The reference page of ops, ``docs/hub-ops.md``."""
    lines = [
        "# Hub ops",
        "",
        "<!-- Generated from rayflow/wire/hub_ops.py; do not edit by hand. Regenerate with:",
        "     python -m rayflow.wire.hub_ops > docs/hub-ops.md -->",
        "",
        "Every op the ReasoningBank hub serves over QUIC RPC, as declared in `rayflow/wire/hub_ops.py`",
        "(also printed by `rayflow hub ops`). *Scope* is the token scope the op needs (`admin` implies",
        "the others); *0-RTT* tells whether the op is idempotent, and so may be sent as TLS early data on",
        "a resumed connection (the others wait for the handshake). Arguments are keyword arguments;",
        "`name?` is optional (the hub's default applies). The client methods of",
        "`rayflow.wire.hub_client.HubClient` and `SyncHubClient` take the same names.",
        "",
        "| op | scope | 0-RTT | arguments | what it does |",
        "|---|---|---|---|---|",
    ]
    for row in describe_ops():
        args = format_args(row["args"]) or "-"
        early = "yes" if row["idempotent"] else "no"
        lines.append(f"| `{row['op']}` | `{row['scope']}` | {early} | {args} | {row['summary']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(format_ops_markdown())
