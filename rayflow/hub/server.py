"""``HubServer``: the ReasoningBank served over QUIC RPC, every call checked against its JWT.

Composition only: :class:`~rayflow.rpc.quic_server.RpcServer` carries the calls, the auth core
verifies each call's token (a cached check, revocation included), :class:`HubService` runs the
op for the verified claims, and every outcome is audited.

Threading: reads run on the event loop (they are sub-millisecond and never wait on a lock that a
disk flush holds for long); writes, which fsync, run on one writer thread so the loop keeps serving
reads while a write is on its way to disk. Audit records are written in batches off the loop: a
crash may lose the last fraction of a second of audit records, never an acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rayflow.auth.claims import Claims, Scope
from rayflow.auth.issuer import TokenIssuer
from rayflow.auth.keys import KeyRing
from rayflow.auth.revocation import RevocationList
from rayflow.auth.verifier import TokenVerifier
from rayflow.config import Config, load_config
from rayflow.errors import AuthError, ConfigError, RayflowError
from rayflow.hub.federated_trust import FederatedKeys, FederatedRevocations, publish_signing_keys
from rayflow.hub.federation import FederationNode, PeerAddress
from rayflow.hub.federation_state import FederationFiles
from rayflow.hub.service import OPS, HubService
from rayflow.memory.bank import ReasoningBank
from rayflow.memory.store import AuditRecord
from rayflow.rpc.dispatch import CallContext, Dispatcher
from rayflow.rpc.quic_server import RpcServer
from rayflow.rpc.tls import verified_name
from rayflow.sync.identity import FederationTrust, ReplicaCredential, ReplicaIdentity
from rayflow.wire.hub_endpoint import HubEndpoint

logger = logging.getLogger(__name__)

#: Audit records are flushed when this many are waiting, or after ``AUDIT_FLUSH_S``.
AUDIT_BATCH = 256
AUDIT_FLUSH_S = 0.2


def signing_keys_path(state_dir: Path) -> Path:
    """The hub's JWT signing key ring under its state directory."""
    return Path(state_dir) / "auth" / "signing-keys.json"


def revocations_path(state_dir: Path) -> Path:
    """The hub's persisted token deny-list under its state directory."""
    return Path(state_dir) / "auth" / "revocations.sqlite3"


class HubServer:
    """A ReasoningBank hub on one QUIC port, with its state (bank, keys, TLS) in one directory.

    Where it listens: exactly ``host`` (UDP ``port``, 0 picks one). The default ``127.0.0.1``
    serves this machine only (``rayflow hub serve``, notebooks, tests); a hub meant for other
    machines binds an address they can reach, as :class:`~actors.hub_replica.HubReplica` binds
    its Ray node's address. Sandboxes reach a loopback hub through their gateway (rewritten to
    loopback by their fence) and any other hub at its own address.

    What its certificate names (``state_dir/tls``, signed by the hub's own CA): ``localhost``,
    ``127.0.0.1``, ``::1``, the bound ``host`` unless it is a wildcard, and ``server_names``;
    reissued under the same CA when that set changes. :attr:`endpoint` tells clients to check the
    bound address itself when it is a real one (``localhost`` for a loopback or wildcard bind).
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "",
        config: Config | None = None,
        server_names: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.region = region
        self.config = config or load_config({"state_dir": self.state_dir})
        self.bank = ReasoningBank(self.state_dir, config=self.config)
        self.key_ring = KeyRing.load_or_create(signing_keys_path(self.state_dir))
        # Tokens hold in every region of a federation: this hub's signing keys are published in
        # the bank's change log, and a revocation is logged there as well as kept locally.
        publish_signing_keys(self.key_ring, self.bank.store)
        self.revocations = FederatedRevocations(
            RevocationList(revocations_path(self.state_dir)), self.bank.store
        )
        self.issuer = TokenIssuer(self.key_ring)
        self.verifier = TokenVerifier(
            FederatedKeys(self.key_ring, self.bank.store),
            issuer=self.issuer.issuer,
            audience=self.issuer.audience,
            revocations=self.revocations,
        )
        self.service = HubService(self.bank, self.issuer, self.revocations, region=region)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-hub-writer")
        self._audit_pending: list[AuditRecord] = []
        self._audit_task: asyncio.Task[None] | None = None
        dispatcher = Dispatcher()
        # Every op of the table (rayflow.wire.hub_ops), checked against its schema, runs the service's
        # method of the same name.
        for op, info in OPS.items():
            dispatcher.register(op, self._handler(op), args=info.args, idempotent=info.idempotent)
        self._server_names = server_names
        self.federation_files = FederationFiles(self.state_dir)
        #: This replica's federation endpoint once it joined one (:meth:`join_federation`).
        self.federation: FederationNode | None = None
        self.rpc = RpcServer(
            dispatcher,
            host=host,
            port=port,
            tls_dir=str(self.state_dir / "tls"),
            server_names=server_names,
            authenticate=self._authenticate,
        )

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.rpc.start()
        self._audit_task = asyncio.get_running_loop().create_task(self._audit_flusher())
        logger.info("hub %s listening on %s:%d", self.region or "-", *self.address)
        # A replica that joined a federation before (and was restarted) rejoins it by itself.
        membership = self.federation_files.membership()
        if membership is not None:
            await self._start_federation(*membership)
            for peer in self.federation_files.peers():
                self.federation.add_peer(peer)  # type: ignore[union-attr]

    async def close(self) -> None:
        if self.federation is not None:
            await self.federation.close()
            self.federation = None
        await self.rpc.close()
        if self._audit_task is not None:
            self._audit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._audit_task
        self._flush_audit()
        self._writer.shutdown(wait=True)
        self.revocations.close()
        self.bank.close()

    async def __aenter__(self) -> HubServer:  # noqa: PYI034 - not meant to be subclassed
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- federation -------------------------------------------------------------------------
    def federation_key(self) -> tuple[str, bytes]:
        """(replica id, public key) for the operator to sign a credential; the key pair is made
        and kept in this hub's state directory."""
        return self.bank.store.replica_id, self.federation_files.public_key()

    async def join_federation(self, credential: ReplicaCredential, trust: FederationTrust) -> PeerAddress:
        """Become a member with the operator's ``credential`` (for this hub's key) and ``trust``;
        returns where peers reach this replica's sync endpoint. Remembered across restarts."""
        if credential.replica_id != self.bank.store.replica_id:
            raise ConfigError("the credential names another replica", replica=credential.replica_id)
        identity = self.federation_files.save_membership(credential, trust)
        if self.federation is not None:
            await self.federation.close()
            self.federation = None
        await self._start_federation(identity, trust)
        assert self.federation is not None
        return self.federation.peer_address()

    async def add_peer(self, peer: PeerAddress) -> None:
        """Keep a sync connection to ``peer`` (remembered across restarts)."""
        if self.federation is None:
            raise ConfigError("this hub has not joined a federation")
        peers = [known for known in self.federation_files.peers() if known.replica_id != peer.replica_id]
        self.federation_files.save_peers([*peers, peer])
        self.federation.add_peer(peer)

    async def _start_federation(self, identity: ReplicaIdentity, trust: FederationTrust) -> None:
        host = self.address[0]
        port_file = self.federation_files.dir / "sync-port"
        port = int(port_file.read_text()) if port_file.is_file() else 0
        node = FederationNode(
            self.bank.store,
            identity,
            trust,
            tls_dir=str(self.state_dir / "tls"),
            host=host,
            port=port,
            server_names=self._server_names,
        )
        try:
            await node.start()
        except OSError:
            # The port it had before a restart is taken: peers learn the new one when they are
            # told again (this replica still dials them at their known addresses).
            node.port = 0
            await node.start()
        port_file.write_text(str(node.address[1]))
        self.federation = node

    @property
    def address(self) -> tuple[str, int]:
        return self.rpc.address

    @property
    def ca_pem(self) -> bytes:
        return self.rpc.ca_pem

    @property
    def endpoint(self) -> HubEndpoint:
        """Where clients reach this hub (once started): its bound address, the CA to pin, its region.

        The name to check the certificate against is the bound address when it is a specific
        non-loopback one (an IP SAN of the certificate), else ``localhost``.
        """
        host, port = self.address
        return HubEndpoint(host, port, self.ca_pem, region=self.region, server_name=verified_name(host))

    def issue_token(
        self, sub: str, tenant: str, namespaces: list[str], scopes: list[str], ttl_s: int | None = None
    ) -> str:
        """Mint a token locally (for the host's operator: the CLI and the Ray actor)."""
        return self.issuer.issue(sub, tenant, namespaces, scopes, ttl_s=ttl_s)

    # --- per call ---------------------------------------------------------------------------
    async def _authenticate(self, ctx: CallContext) -> Claims:
        try:
            return self.verifier.verify(ctx.token)
        except AuthError as error:
            self._audit("-", "-", ctx.op, "", f"refused:{error.code}", None, error.details.get("reason", ""))
            raise

    def _handler(self, op: str) -> Any:
        method = getattr(self.service, op)
        writes = OPS[op].scope != Scope.READ

        async def handle(ctx: CallContext, **args: Any) -> Any:
            claims: Claims = ctx.principal  # type: ignore[assignment]
            started = time.perf_counter()
            namespace = str(args.get("namespace", ""))
            try:
                if writes:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(
                        self._writer, functools.partial(method, claims, **args)
                    )
                else:
                    result = method(claims, **args)
            except RayflowError as error:
                self._audit(claims.sub, claims.tenant, op, namespace, f"error:{error.code}", started)
                raise
            self._audit(claims.sub, claims.tenant, op, namespace, "ok", started)
            return result

        return handle

    # --- audit ------------------------------------------------------------------------------
    def _audit(
        self,
        actor: str,
        tenant: str,
        op: str,
        namespace: str,
        outcome: str,
        started: float | None,
        detail: str = "",
    ) -> None:
        latency = None if started is None else (time.perf_counter() - started) * 1000.0
        self._audit_pending.append(
            AuditRecord(time.time(), actor, tenant, op, namespace, outcome, latency, detail)
        )

    async def _audit_flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(AUDIT_FLUSH_S)
            if self._audit_pending:
                # Swapped on the loop thread, the only one that appends, so no record slips between.
                batch, self._audit_pending = self._audit_pending, []
                await loop.run_in_executor(self._writer, self._write_audit, batch)

    def _flush_audit(self) -> None:
        batch, self._audit_pending = self._audit_pending, []
        self._write_audit(batch)

    def _write_audit(self, batch: list[AuditRecord]) -> None:
        try:
            self.bank.store.audit(batch)
        except RayflowError:
            logger.exception("could not write %d audit records", len(batch))
