"""The hub's operations: what each RPC op does to the ReasoningBank, for an authenticated caller.

No transport here: every op takes the verified :class:`~rayflow.auth.claims.Claims` of the caller
and plain arguments, checks the scope and namespace the op needs, and calls the bank with the
tenant *from the token* (never from the arguments), so a caller cannot even name another tenant.
The RPC server maps ops onto these methods (see :mod:`rayflow.hub.server`).
"""

from __future__ import annotations

import time
from typing import Any

from rayflow.auth.authorize import authorize, effective_scopes
from rayflow.auth.claims import Claims, Scope
from rayflow.auth.issuer import TokenIssuer
from rayflow.errors import InvalidInputError, ItemNotFoundError, PermissionDeniedError
from rayflow.hub.federated_trust import FederatedRevocations
from rayflow.memory.bank import ReasoningBank
from rayflow.namespace import ROOT, normalize_namespace
from rayflow.wire.hub_ops import OPS, OpInfo
from rayflow.wire.hub_records import item_to_wire, scored_to_wire, trajectory_from_wire, verdict_to_wire

HUB_VERSION = 1

__all__ = ["HUB_VERSION", "OPS", "HubService", "OpInfo"]


class HubService:
    """The ReasoningBank's operations for authenticated callers."""

    def __init__(
        self,
        bank: ReasoningBank,
        issuer: TokenIssuer,
        revocations: FederatedRevocations,
        *,
        region: str = "",
        started_at: float | None = None,
    ) -> None:
        self.bank = bank
        self.issuer = issuer
        self.revocations = revocations
        self.region = region
        self.started_at = time.time() if started_at is None else started_at

    # --- read -------------------------------------------------------------------------------
    def health(self, claims: Claims) -> dict[str, Any]:
        _require_scope(claims, Scope.READ)
        return {
            "ok": True,
            "version": HUB_VERSION,
            "replica_id": self.bank.store.replica_id,
            "region": self.region,
            "uptime_s": time.time() - self.started_at,
        }

    def stats(self, claims: Claims) -> dict[str, Any]:
        authorize(claims, Scope.READ, None)
        self._ensure_tenant(claims.tenant)
        return self.bank.stats(claims.tenant)

    def search(
        self,
        claims: Claims,
        *,
        query: str | None = None,
        embedding: bytes | None = None,
        k: int = 5,
        namespace: str = ROOT,
        domain: str | None = None,
        outcome: str | None = None,
        min_confidence: float = 0.0,
        mmr_lambda: float | None = None,
    ) -> list[dict[str, Any]]:
        """Retrieve within ``namespace`` (a prefix the token must cover)."""
        prefix = normalize_namespace(namespace, allow_root=True)
        authorize(claims, Scope.READ, prefix)
        if (query is None) == (embedding is None):
            raise InvalidInputError("give exactly one of query or embedding")
        self._ensure_tenant(claims.tenant)
        results = self.bank.retrieve(
            claims.tenant,
            query if query is not None else embedding,
            k=k,
            namespace=prefix,
            domain=domain,
            outcome=outcome,
            min_confidence=min_confidence,
            mmr_lambda=mmr_lambda,
        )
        return [scored_to_wire(r) for r in results]

    def get(self, claims: Claims, *, id: str) -> dict[str, Any]:
        _require_scope(claims, Scope.READ)
        self._ensure_tenant(claims.tenant)
        item = self.bank.get(claims.tenant, id)
        if not claims.allows_namespace(item.namespace):
            # Same answer as a missing id: an item outside the token's namespaces does not exist for it.
            raise ItemNotFoundError(f"no item {id}")
        return item_to_wire(item)

    # --- write ------------------------------------------------------------------------------
    def store_pattern(
        self,
        claims: Claims,
        *,
        namespace: str,
        title: str,
        content: str,
        description: str = "",
        tags: list[str] | None = None,
        domain: str = "",
        outcome: str = "success",
        confidence: float = 0.5,
        source_task: str = "",
        embedding: bytes | None = None,
    ) -> dict[str, Any]:
        namespace = normalize_namespace(namespace)
        authorize(claims, Scope.WRITE, namespace)
        self._ensure_tenant(claims.tenant)
        item = self.bank.store_item(
            claims.tenant,
            namespace=namespace,
            title=title,
            description=description,
            content=content,
            tags=tags or [],
            domain=domain,
            outcome=outcome,
            confidence=confidence,
            source_task=source_task,
            source_agent=claims.sub,
            embedding=embedding,
        )
        return {"id": item.id}

    def edit_item(
        self,
        claims: Claims,
        *,
        id: str,
        title: str | None = None,
        description: str | None = None,
        content: str | None = None,
        tags: list[str] | None = None,
    ) -> dict[str, Any]:
        _require_scope(claims, Scope.WRITE)
        self._ensure_tenant(claims.tenant)
        current = self.bank.get(claims.tenant, id)
        if not claims.allows_namespace(current.namespace):
            raise ItemNotFoundError(f"no item {id}")  # as for get: outside the token, it does not exist
        authorize(claims, Scope.WRITE, current.namespace)
        item = self.bank.edit_item(claims.tenant, id, title=title, description=description, content=content, tags=tags)
        return item_to_wire(item)

    def record_trajectory(self, claims: Claims, *, trajectory: dict[str, Any]) -> dict[str, Any]:
        parsed = trajectory_from_wire(trajectory)
        namespace = normalize_namespace(parsed.namespace)
        authorize(claims, Scope.WRITE, namespace)
        if parsed.agent_id and parsed.agent_id != claims.sub:
            raise PermissionDeniedError("agent_id must be the token's subject")
        self._ensure_tenant(claims.tenant)
        self._check_items_visible(claims, parsed.used_item_ids)
        record = self.bank.record_trajectory(claims.tenant, parsed)
        return {
            "id": record.id,
            "verdict": verdict_to_wire(record.verdict),
            "item_ids": list(record.item_ids),
        }

    def report_outcome(self, claims: Claims, *, item_ids: list[str], success: bool) -> dict[str, Any]:
        _require_scope(claims, Scope.WRITE)
        if not item_ids or not all(isinstance(i, str) for i in item_ids):
            raise InvalidInputError("item_ids must be a non-empty list of ids")
        self._ensure_tenant(claims.tenant)
        self._check_items_visible(claims, item_ids)
        self.bank.report_outcome(claims.tenant, item_ids, success=success)
        return {"reported": len(set(item_ids))}

    # --- admin ------------------------------------------------------------------------------
    def consolidate(self, claims: Claims, *, full: bool = False) -> dict[str, Any]:
        authorize(claims, Scope.ADMIN, None)
        self._ensure_tenant(claims.tenant)
        report = self.bank.consolidate(claims.tenant, full=full)
        return {
            "id": report.id,
            "examined": report.examined,
            "merged": report.merged,
            "contradictions": report.contradictions,
            "pruned": report.pruned,
        }

    def revoke(self, claims: Claims, *, jti: str, expires_at: float, reason: str = "") -> dict[str, Any]:
        authorize(claims, Scope.ADMIN, None)
        self.revocations.revoke(jti, expires_at, reason or f"revoked by {claims.sub}")
        return {"revoked": jti}

    def issue_token(
        self,
        claims: Claims,
        *,
        sub: str,
        namespaces: list[str],
        scopes: list[str],
        ttl_s: int | None = None,
    ) -> dict[str, Any]:
        """Mint a token for the admin's own tenant, never wider than the admin's namespaces."""
        authorize(claims, Scope.ADMIN, None)
        for pattern in namespaces:
            base = pattern.rstrip("*").rstrip("/")
            if not claims.allows_namespace(base):
                raise PermissionDeniedError(f"namespace {pattern!r} is outside this admin's namespaces")
        token = self.issuer.issue(sub, claims.tenant, namespaces, scopes, ttl_s=ttl_s)
        return {"token": token}

    # --- helpers ----------------------------------------------------------------------------
    def _ensure_tenant(self, tenant: str) -> None:
        # A tenant exists for the hub as soon as a valid token names it; its data key is created here.
        if not self.bank.has_tenant(tenant):
            self.bank.create_tenant(tenant)

    def _check_items_visible(self, claims: Claims, item_ids: Any) -> None:
        for item_id in item_ids:
            if not claims.allows_namespace(self.bank.get(claims.tenant, item_id).namespace):
                raise ItemNotFoundError(f"no item {item_id}")


def _require_scope(claims: Claims, scope: str) -> None:
    """Scope check for ops whose namespace is only known after a lookup (checked there)."""
    if scope not in effective_scopes(claims):
        raise PermissionDeniedError(f"token lacks the scope {scope!r}", reason="missing_scope")
