"""The one error hierarchy of rayflow, with stable codes that also travel over RPC.

Why one hierarchy: a caller (a CLI, a notebook, a sandboxed agent talking to a hub over QUIC)
must be able to tell "your input was wrong" from "the server broke" from "you are not allowed"
without parsing messages. Every error has a stable string ``code`` that never changes once
released; the class is found again from the code on the far side of a wire
(:func:`error_from_code`).
"""

from __future__ import annotations

from typing import Any


class RayflowError(Exception):
    """Base of every error rayflow raises on purpose."""

    code: str = "internal"
    #: True when retrying the same call later may succeed (overload, timeouts).
    retryable: bool = False

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """Plain form for a wire or a log: ``{"code", "message", "details"}``."""
        return {"code": self.code, "message": self.message, "details": dict(self.details)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# --- input ------------------------------------------------------------------------------------
class InvalidInputError(RayflowError):
    """The request or its arguments are malformed."""

    code = "invalid_input"


class EmptyTextError(InvalidInputError):
    """Text that must carry content was empty or only whitespace."""

    code = "empty_text"


class PayloadTooLargeError(InvalidInputError):
    """A text, frame or payload exceeds its configured size limit."""

    code = "payload_too_large"


class DimensionMismatchError(InvalidInputError):
    """A vector has a different dimension than the store or index expects."""

    code = "dimension_mismatch"


class InvalidNamespaceError(InvalidInputError):
    """A namespace path is not well formed (empty segment, '..', non-ASCII look-alikes, ...)."""

    code = "invalid_namespace"


class ConfigError(InvalidInputError):
    """A configuration value is missing or wrong."""

    code = "config_error"


# --- lookups ----------------------------------------------------------------------------------
class NotFoundError(RayflowError):
    """The named thing does not exist (or is not visible to the caller)."""

    code = "not_found"


class UnknownTenantError(NotFoundError):
    """The tenant has not been created in this store."""

    code = "unknown_tenant"


class ItemNotFoundError(NotFoundError):
    """No memory item with this id exists for the tenant."""

    code = "item_not_found"


# --- storage ----------------------------------------------------------------------------------
class StorageError(RayflowError):
    """The storage layer failed."""

    code = "storage_error"


class SchemaTooNewError(StorageError):
    """The database was written by a newer rayflow whose schema this version cannot read."""

    code = "schema_too_new"


class IndexCorruptError(StorageError):
    """A vector index file could not be loaded; it is rebuilt from SQLite."""

    code = "index_corrupt"


class EncryptionError(StorageError):
    """Data could not be encrypted or decrypted (wrong key, tampered ciphertext)."""

    code = "encryption_error"


# --- auth (used by the hub) -------------------------------------------------------------------
class AuthError(RayflowError):
    """The caller could not be authenticated or is not allowed to do this."""

    code = "unauthorized"


class PermissionDeniedError(AuthError):
    """The caller is authenticated but lacks the scope or namespace for this call."""

    code = "permission_denied"


# --- transport --------------------------------------------------------------------------------
class TransportError(RayflowError):
    """The connection to a peer failed."""

    code = "transport_error"
    retryable = True


class DeadlineExceededError(TransportError):
    """The call did not finish before its deadline."""

    code = "deadline_exceeded"


class HubUnreachableError(TransportError):
    """The hub could not be reached from where work was to run (a node, a sandbox's network)."""

    code = "hub_unreachable"


class OverloadedError(RayflowError):
    """The server is at a resource limit (in-flight bytes, concurrent calls); retry later."""

    code = "overloaded"
    retryable = True


class TooEarlyError(RayflowError):
    """A non-idempotent call arrived as 0-RTT early data, which an attacker could replay.

    Retrying once the TLS handshake has completed succeeds.
    """

    code = "too_early"
    retryable = True


# --- sandboxes and workers ---------------------------------------------------------------------
class SandboxError(RayflowError):
    """A sandbox or the worker holding it failed (not the agent's work): the subtask can run elsewhere."""

    code = "sandbox_failed"
    retryable = True


class WorkerLostError(SandboxError):
    """A worker died or became unreachable while it held a subtask."""

    code = "worker_lost"


class UnknownOperationError(InvalidInputError):
    """The RPC op is not known to this server."""

    code = "unknown_op"


def _all_subclasses(cls: type[RayflowError]) -> list[type[RayflowError]]:
    out: list[type[RayflowError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(code: str, message: str = "", **details: Any) -> RayflowError:
    """Rebuild the typed error for ``code`` (as received over a wire); unknown codes give the base."""
    for cls in [RayflowError, *_all_subclasses(RayflowError)]:
        if cls.code == code:
            return cls(message, **details)
    err = RayflowError(message, **details)
    err.code = code
    return err
