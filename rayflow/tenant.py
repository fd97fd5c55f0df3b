"""The one rule for tenant names, shared by the memory bank and the access-token claims.

Why one rule: a tenant named in a token must be a tenant the bank could have created, so the
issuer, the verifier and the bank refuse exactly the same names. Why this strict: a tenant name
ends up in file names, log lines and SQL parameters, so it is kept to a small ASCII alphabet
with no leading dot (no hidden files, no ``.`` or ``..``) rather than escaped at each use.
"""

from __future__ import annotations

import re

from rayflow.errors import InvalidInputError

#: Longest tenant name accepted.
MAX_TENANT_NAME_LENGTH = 64

_TENANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def validate_tenant_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid tenant name, else raise :class:`InvalidInputError`.

    Valid: 1..64 ASCII letters, digits, ``-``, ``_`` and ``.``, not starting with ``.``. Names are
    never rewritten (no case folding, no trimming), because a rewrite could map two names onto one.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_TENANT_NAME_LENGTH:
        raise InvalidInputError(f"tenant name must be 1..{MAX_TENANT_NAME_LENGTH} characters")
    if _TENANT_NAME.fullmatch(name) is None:
        raise InvalidInputError(
            f"tenant name may use ASCII letters, digits, '-', '_' and '.', and may not start with '.': {name!r}"
        )
    return name
