"""How an RPC op's keyword arguments are declared: accepted types, and whether each must be present.

Shared by the op table (:mod:`rayflow.wire.hub_ops`), which declares each op's arguments once, and
the server's dispatcher (:mod:`rayflow.rpc.dispatch`), which checks every call against them. It
lives in the wall because the table does, and the table is read by clients inside sandboxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arg:
    """One keyword argument of an op: accepted Python types, and whether it must be present.

    ``bool`` is not accepted where ``int`` or ``float`` is asked (msgpack keeps them apart, and a
    flag passed as a count is a caller bug); an ``int`` is accepted where ``float`` is.
    """

    types: tuple[type, ...]
    required: bool = True

    def __init__(self, types: type | tuple[type, ...], required: bool = True) -> None:
        object.__setattr__(self, "types", types if isinstance(types, tuple) else (types,))
        object.__setattr__(self, "required", required)
        if not self.types or not all(isinstance(t, type) for t in self.types):
            raise TypeError("Arg types must be one or more classes")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return bool in self.types
        if isinstance(value, int) and float in self.types:
            return True
        return isinstance(value, self.types)

    @property
    def type_names(self) -> tuple[str, ...]:
        """The accepted types by name (``nil`` for ``None``), as the wire knows them."""
        return tuple("nil" if t is type(None) else t.__name__ for t in self.types)

    def describe(self) -> str:
        return " | ".join(self.type_names)


def optional(types: type | tuple[type, ...]) -> Arg:
    """An argument that may be left out (the handler's default applies)."""
    return Arg(types, required=False)
