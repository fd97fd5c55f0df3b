"""Vector clocks: per-replica counters that tell "happened before" from "concurrent".

Why: a replica's change log numbers its own changes 1, 2, 3, ...; the highest number held per
replica (the store's version vector) is therefore a vector clock, and comparing two of them says
whether one replica has seen everything the other has (pull nothing), or they diverged (exchange).
A delta carries the clock of its maker as its causal dependencies, and a receiver holds a delta
back until its own clock dominates that context.

Why immutable and normalized: clocks travel inside deltas, sit in buffers and are used as
dictionary keys in tests; with zero entries dropped and entries kept sorted, two clocks that
mean the same thing are equal and hash equal, whatever order or zero padding they arrived with.

Why validated: clocks arrive from peers over a wire. Replica ids and counters are bounded
(:data:`MAX_REPLICA_ID_LENGTH`, :data:`MAX_COUNTER`, :data:`MAX_REPLICAS`) so a hostile peer cannot
make one clock cost unbounded memory or produce counters SQLite's int64 cannot store.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rayflow.errors import InvalidInputError

#: Most entries one clock may hold: far above any real deployment's replica count, low enough
#: that a clock from a peer stays small.
MAX_REPLICAS = 1024
#: Longest replica id accepted (store replica ids are ~27 characters).
MAX_REPLICA_ID_LENGTH = 128
#: Counters are SQLite integers (signed 64-bit): this is one past the largest.
MAX_COUNTER = 2**63


class Order(enum.Enum):
    """How two clocks relate in the partial order of causality."""

    BEFORE = "before"
    AFTER = "after"
    EQUAL = "equal"
    CONCURRENT = "concurrent"


def validate_replica_id(replica: object) -> str:
    """Return ``replica`` if it is a usable replica id, else raise :class:`InvalidInputError`."""
    if not isinstance(replica, str) or not replica or len(replica) > MAX_REPLICA_ID_LENGTH:
        raise InvalidInputError(f"replica id must be a string of 1..{MAX_REPLICA_ID_LENGTH} characters")
    return replica


def validate_counter(value: object, *, what: str = "counter") -> int:
    """Return ``value`` if it is an int in ``[0, MAX_COUNTER)``, else raise :class:`InvalidInputError`.

    ``bool`` is refused although it is an ``int`` subclass: ``True`` on a wire is a type confusion,
    not the number one.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value < MAX_COUNTER:
        raise InvalidInputError(f"{what} must be in [0, 2**63): {value}")
    return value


def _normalized(pairs: Iterable[tuple[object, object]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for replica, counter in pairs:
        validate_replica_id(replica)
        validate_counter(counter)
        if replica in out:
            raise InvalidInputError(f"replica {replica!r} appears twice in a vector clock")
        out[replica] = counter  # type: ignore[index]
        if len(out) > MAX_REPLICAS:
            raise InvalidInputError(f"a vector clock may name at most {MAX_REPLICAS} replicas")
    return {replica: counter for replica, counter in out.items() if counter}


@dataclass(frozen=True)
class VectorClock:
    """An immutable map from replica id to counter; a missing replica counts as zero.

    Build one with :meth:`of` (from a mapping) or :meth:`from_wire` (from a peer); ``VectorClock()``
    is the empty clock, below every other.
    """

    #: Nonzero entries sorted by replica id: the canonical form that equality and hashing use.
    entries: tuple[tuple[str, int], ...] = ()
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.entries, (tuple, list)):
            raise InvalidInputError("vector clock entries must be a sequence of (replica, counter) pairs")
        pairs: list[tuple[object, object]] = []
        for pair in self.entries:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidInputError("vector clock entries must be (replica, counter) pairs")
            pairs.append((pair[0], pair[1]))
        self._set(_normalized(pairs))

    def _set(self, index: dict[str, int]) -> None:
        object.__setattr__(self, "entries", tuple(sorted(index.items())))
        object.__setattr__(self, "_index", index)

    @classmethod
    def _trusted(cls, index: dict[str, int]) -> VectorClock:
        """A clock from entries already known valid (results of merge/advance): skips validation."""
        clock = object.__new__(cls)
        clock._set({replica: counter for replica, counter in index.items() if counter})
        return clock

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def of(cls, mapping: Mapping[str, int]) -> VectorClock:
        """The clock with these counters (zeros dropped); raises :class:`InvalidInputError` if invalid."""
        if not isinstance(mapping, Mapping):
            raise InvalidInputError(f"a vector clock is built from a mapping, not {type(mapping).__name__}")
        if len(mapping) > MAX_REPLICAS:
            raise InvalidInputError(f"a vector clock may name at most {MAX_REPLICAS} replicas")
        clock = object.__new__(cls)
        clock._set(_normalized(mapping.items()))
        return clock

    @classmethod
    def from_wire(cls, obj: Any) -> VectorClock:
        """Rebuild a clock received from a peer: anything but a map of str to int is refused."""
        if not isinstance(obj, dict):
            raise InvalidInputError(f"a vector clock on the wire is a map, not {type(obj).__name__}")
        return cls.of(obj)

    def to_wire(self) -> dict[str, int]:
        """Plain form for msgpack: a map of replica id to counter, zeros omitted."""
        return dict(self.entries)

    # --- reading ------------------------------------------------------------------------------
    def get(self, replica: str) -> int:
        """The counter of ``replica``; zero if the clock does not name it."""
        return self._index.get(replica, 0)

    def items(self) -> tuple[tuple[str, int], ...]:
        """The nonzero entries, sorted by replica id."""
        return self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, replica: object) -> bool:
        return replica in self._index

    # --- the lattice --------------------------------------------------------------------------
    def dominates(self, other: VectorClock) -> bool:
        """True if every counter of this clock is at least ``other``'s: it has seen all ``other`` has."""
        mine = self._index
        return all(mine.get(replica, 0) >= counter for replica, counter in other.entries)

    def __le__(self, other: object) -> bool:
        """``a <= b``: ``a`` is dominated by ``b`` (a partial order: ``not a <= b`` does not mean ``b < a``)."""
        if not isinstance(other, VectorClock):
            return NotImplemented
        return other.dominates(self)

    def __lt__(self, other: object) -> bool:
        """``a < b``: ``a`` happened strictly before ``b``."""
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self != other and other.dominates(self)

    def compare(self, other: VectorClock) -> Order:
        """Where this clock stands relative to ``other``: before, after, equal or concurrent."""
        below = other.dominates(self)
        above = self.dominates(other)
        if below and above:
            return Order.EQUAL
        if below:
            return Order.BEFORE
        if above:
            return Order.AFTER
        return Order.CONCURRENT

    def merge(self, other: VectorClock) -> VectorClock:
        """Pointwise maximum: the least clock that has seen everything both have seen.

        Raises :class:`InvalidInputError` if the union would name more than :data:`MAX_REPLICAS`.
        """
        merged = dict(self._index)
        for replica, counter in other.entries:
            if counter > merged.get(replica, 0):
                merged[replica] = counter
        if len(merged) > MAX_REPLICAS:
            raise InvalidInputError(f"a vector clock may name at most {MAX_REPLICAS} replicas")
        return VectorClock._trusted(merged)

    def advance(self, replica: str, seq: int) -> VectorClock:
        """This clock with ``replica``'s counter raised to ``seq`` (never lowered: replays are harmless)."""
        validate_replica_id(replica)
        validate_counter(seq, what="seq")
        if seq <= self.get(replica):
            return self
        if replica not in self._index and len(self._index) >= MAX_REPLICAS:
            raise InvalidInputError(f"a vector clock may name at most {MAX_REPLICAS} replicas")
        return VectorClock._trusted({**self._index, replica: seq})
