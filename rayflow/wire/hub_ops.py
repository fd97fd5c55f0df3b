"""The hub's op table: every op's name, the token scope it needs and whether a replay is harmless.

One definition shared by the server side (:mod:`rayflow.hub.service`, :mod:`rayflow.hub.server`)
and the client (:mod:`rayflow.wire.hub_client`). It lives apart from the service because the client
runs inside sandbox images that carry neither the bank nor the token machinery: this module
imports nothing but the standard library. That is also why the scopes are written out here as the
plain strings tokens carry rather than taken from :class:`rayflow.auth.claims.Scope` (importing
``rayflow.auth`` loads the signing and revocation code); a unit test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The scope strings a token carries (the same values as :class:`rayflow.auth.claims.Scope`).
READ = "reasoningbank:read"
WRITE = "reasoningbank:write"
ADMIN = "admin"


@dataclass(frozen=True)
class OpInfo:
    """How an op may be called: the scope it needs and whether a replay of it is harmless."""

    scope: str
    idempotent: bool


#: Every op the hub serves. Idempotent ops may arrive as 0-RTT early data; the others never do.
OPS: dict[str, OpInfo] = {
    "health": OpInfo(READ, True),
    "stats": OpInfo(READ, True),
    "search": OpInfo(READ, True),
    "get": OpInfo(READ, True),
    "store_pattern": OpInfo(WRITE, False),
    "record_trajectory": OpInfo(WRITE, False),
    "report_outcome": OpInfo(WRITE, False),
    "consolidate": OpInfo(ADMIN, False),
    "revoke": OpInfo(ADMIN, False),
    "issue_token": OpInfo(ADMIN, False),
}
