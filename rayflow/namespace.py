"""Namespace paths inside a tenant: validation and prefix matching.

A namespace is a ``/``-separated path such as ``swarm/task-123`` that lives *inside* one tenant;
the tenant is never part of the path, so no path can name another tenant's data. Validation is
strict on purpose: the same rules later guard JWT namespace claims, where tricks such as
``a/../b``, empty segments or Unicode look-alikes must not widen access.
"""

from __future__ import annotations

import re

from rayflow.errors import InvalidNamespaceError

_SEGMENT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_NAMESPACE_LENGTH = 255
MAX_DEPTH = 16
#: The whole tenant: every namespace is below it.
ROOT = ""


def normalize_namespace(namespace: str, *, allow_root: bool = False) -> str:
    """Validate ``namespace`` and return its canonical form (lower-case, no surrounding slashes).

    Only ASCII letters, digits, ``.``, ``_`` and ``-`` are allowed in a segment, a segment may not
    start with a dot (so ``.`` and ``..`` are impossible), and there are no empty segments.
    Upper case is folded to lower case; anything else raises :class:`InvalidNamespaceError`
    instead of being silently rewritten, because a rewrite could map two names onto one.
    """
    if not isinstance(namespace, str):
        raise InvalidNamespaceError(f"namespace must be a string, got {type(namespace).__name__}")
    if namespace.strip("/") == "":
        if allow_root and namespace in ("", "/"):
            return ROOT
        raise InvalidNamespaceError("namespace is empty")
    if len(namespace) > MAX_NAMESPACE_LENGTH:
        raise InvalidNamespaceError(f"namespace longer than {MAX_NAMESPACE_LENGTH} characters")
    if not namespace.isascii():
        raise InvalidNamespaceError(f"namespace has non-ASCII characters: {namespace!r}")
    trimmed = namespace.strip("/").lower()
    segments = trimmed.split("/")
    if len(segments) > MAX_DEPTH:
        raise InvalidNamespaceError(f"namespace deeper than {MAX_DEPTH} segments")
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise InvalidNamespaceError(f"invalid namespace segment {segment!r} in {namespace!r}")
    return "/".join(segments)


def namespace_within(namespace: str, prefix: str) -> bool:
    """True if canonical ``namespace`` equals ``prefix`` or lies below it, segment-wise.

    ``swarm/a`` is within ``swarm`` but ``swarmx`` is not; the root prefix contains everything.
    """
    if prefix == ROOT:
        return True
    return namespace == prefix or namespace.startswith(prefix + "/")
