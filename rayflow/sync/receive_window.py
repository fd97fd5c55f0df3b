"""The receiving side of causal delivery: hold deltas back until what they depend on has arrived.

Why: deltas reach a replica in any order (pushes race pulls, regions reconnect, a peer relays
another's changes), but some changes fail when applied before their causes (an ``item.delete``
before the ``item.put`` from another replica). :class:`ReceiveWindow` takes deltas in arrival
order and hands them out in an order where each delta comes after everything its context names,
exactly once.

Why bounded: the buffer of early arrivals is the one place a slow or hostile peer could make a
replica grow without limit, so it has a count and a byte bound. A delta refused for space is not
lost: its seq stays known, :meth:`ReceiveWindow.gaps` reports it as missing, and the next pull
(after :meth:`ReceiveWindow.wants`) fetches it again. Progress is guaranteed because a delta that
is deliverable on arrival is never buffered, hence never refused.

Why sans-IO: the window is a plain state machine (deltas in, deltas out), so every interleaving
can be tested with function calls; the shell that talks to peers and to the store is elsewhere.
Not thread-safe: one owner drives it.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

from rayflow.errors import InvalidInputError
from rayflow.sync.delta import Delta
from rayflow.sync.vector_clock import MAX_REPLICAS, VectorClock

#: Default bound on deltas held back waiting for their causes.
DEFAULT_MAX_BUFFERED = 10_000
#: Default bound on the bytes (:attr:`Delta.size`) of deltas held back.
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ReceiveStats:
    """Counters of a window, for metrics and tests."""

    #: Deltas held back now, and their bytes.
    buffered: int
    buffered_bytes: int
    #: Offers ignored because the delta was already applied or already buffered.
    duplicates: int
    #: Offers refused because the buffer was full (they are fetched again by pull).
    dropped: int
    #: Deltas handed out for applying.
    delivered: int
    #: Buffered deltas discarded because their contexts depend on each other in a cycle, which no
    #: honest history produces: a sign of a broken or hostile peer.
    rejected: int


@dataclass
class _Pending:
    """A buffered delta and how far its context has been found satisfied."""

    delta: Delta
    size: int
    #: The context's (replica, seq) requirements in order, and the index of the first unmet one.
    requirements: tuple[tuple[str, int], ...]
    cursor: int = 0


class ReceiveWindow:
    """Causal delivery of deltas from any number of origins, with a bounded reorder buffer."""

    def __init__(
        self,
        applied: VectorClock,
        *,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        if not isinstance(applied, VectorClock):
            raise InvalidInputError(f"applied is a VectorClock, not {type(applied).__name__}")
        for name, value in (("max_buffered", max_buffered), ("max_buffered_bytes", max_buffered_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{name} must be a non-negative integer: {value!r}")
        self._max_buffered = max_buffered
        self._max_buffered_bytes = max_buffered_bytes
        self._applied: dict[str, int] = dict(applied.items())
        #: Highest seq known to exist per replica (offered, dropped or named by a context); never
        #: below ``_applied``. The seqs between the two are buffered or missing.
        self._known: dict[str, int] = dict(self._applied)
        #: Sum over replicas of ``_known - _applied``: buffered plus missing seqs, kept in O(1).
        self._outstanding = 0
        self._buffer: dict[tuple[str, int], _Pending] = {}
        self._buffered_bytes = 0
        #: Per replica, a min-heap of (seq needed, origin, seq) of buffered deltas blocked on it.
        self._waiting: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
        self._duplicates = 0
        self._dropped = 0
        self._delivered = 0
        self._rejected = 0

    # --- reading ------------------------------------------------------------------------------
    @property
    def applied(self) -> VectorClock:
        """What has been delivered: per origin, the seq up to which every delta was handed out."""
        return VectorClock.of(self._applied)

    def wants(self) -> VectorClock:
        """The clock to pull after: a peer should send every delta above it (buffered ones included,
        since a peer cannot know which of them this window holds; re-offers are cheap duplicates)."""
        return self.applied

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Missing seqs per origin, as inclusive ranges, up to the highest seq known for it.

        A seq is known when a delta with it was offered (even if refused for space) or when a
        buffered delta's context requires it. Empty exactly when nothing is buffered and nothing
        known is missing.
        """
        buffered: dict[str, list[int]] = defaultdict(list)
        for origin, seq in self._buffer:
            buffered[origin].append(seq)
        out: dict[str, list[tuple[int, int]]] = {}
        for replica, known in sorted(self._known.items()):
            low = self._applied.get(replica, 0) + 1
            if known < low:
                continue
            ranges: list[tuple[int, int]] = []
            for seq in sorted(buffered.get(replica, ())):
                if seq > low:
                    ranges.append((low, seq - 1))
                low = seq + 1
            if low <= known:
                ranges.append((low, known))
            if ranges:
                out[replica] = ranges
        return out

    @property
    def stats(self) -> ReceiveStats:
        """Current counters."""
        return ReceiveStats(
            buffered=len(self._buffer),
            buffered_bytes=self._buffered_bytes,
            duplicates=self._duplicates,
            dropped=self._dropped,
            delivered=self._delivered,
            rejected=self._rejected,
        )

    # --- receiving ----------------------------------------------------------------------------
    def offer(self, delta: Delta) -> list[Delta]:
        """Take one arrived delta; return the deltas that became deliverable, in a causal order.

        The returned deltas must be applied in the order given. Duplicates are ignored; a delta
        that must wait is buffered, or refused (counted as dropped) if the buffer is full.
        Raises :class:`InvalidInputError` if ``delta`` is not a :class:`Delta`, or if it would make
        the window track more than :data:`MAX_REPLICAS` replicas.
        """
        if not isinstance(delta, Delta):
            raise InvalidInputError(f"a window is offered Delta objects, not {type(delta).__name__}")
        if delta.seq <= self._applied.get(delta.origin, 0) or delta.key in self._buffer:
            self._duplicates += 1
            return []
        self._learn(delta)
        pending = _Pending(delta, delta.size, delta.context.items())
        blocker = self._first_unmet(pending)
        if blocker is None:
            delivered = self._deliver_cascade(delta)
        else:
            if (
                len(self._buffer) >= self._max_buffered
                or self._buffered_bytes + pending.size > self._max_buffered_bytes
            ):
                self._dropped += 1
                return []
            self._buffer[delta.key] = pending
            self._buffered_bytes += pending.size
            self._wait(pending, blocker)
            delivered = []
        self._reject_deadlocked()
        return delivered

    def reset_to(self, applied: VectorClock) -> list[Delta]:
        """Restart from ``applied`` (after loading a snapshot); return buffered deltas now deliverable.

        Buffered deltas the snapshot already covers are discarded; the rest wait on the new clock.
        """
        if not isinstance(applied, VectorClock):
            raise InvalidInputError(f"applied is a VectorClock, not {type(applied).__name__}")
        self._applied = dict(applied.items())
        for replica, seq in self._applied.items():
            if seq > self._known.get(replica, 0):
                self._known[replica] = seq
        self._outstanding = sum(known - self._applied.get(r, 0) for r, known in self._known.items())
        pendings = list(self._buffer.values())
        self._buffer.clear()
        self._buffered_bytes = 0
        self._waiting.clear()
        ready: list[Delta] = []
        for pending in pendings:
            delta = pending.delta
            if delta.seq <= self._applied.get(delta.origin, 0):
                continue
            pending.cursor = 0
            self._buffer[delta.key] = pending
            self._buffered_bytes += pending.size
            blocker = self._first_unmet(pending)
            if blocker is None:
                ready.append(delta)
            else:
                self._wait(pending, blocker)
        delivered: list[Delta] = []
        # Deliver ready ones in seq order per origin: within one origin only the lowest can be
        # ready, and the cascade after it picks up its successors.
        for delta in sorted(ready, key=lambda d: d.seq):
            if delta.key in self._buffer:
                self._unbuffer(delta.key)
                delivered.extend(self._deliver_cascade(delta))
        self._reject_deadlocked()
        return delivered

    # --- internals ----------------------------------------------------------------------------
    def _learn(self, delta: Delta) -> None:
        """Raise the known seqs from what ``delta`` proves exists (itself and its context)."""
        claims = [*delta.context.items(), (delta.origin, delta.seq)]
        new_replicas = {replica for replica, _ in claims if replica not in self._known}
        if len(self._known) + len(new_replicas) > MAX_REPLICAS:
            raise InvalidInputError(f"a receive window tracks at most {MAX_REPLICAS} replicas")
        for replica, seq in claims:
            known = self._known.get(replica, 0)
            if seq > known:
                self._outstanding += seq - max(known, self._applied.get(replica, 0))
                self._known[replica] = seq

    def _first_unmet(self, pending: _Pending) -> tuple[str, int] | None:
        """Advance ``pending``'s cursor past met requirements; return the first unmet one, if any.

        Requirements once met stay met (applied only grows between resets), so each is checked
        a bounded number of times overall.
        """
        requirements = pending.requirements
        while pending.cursor < len(requirements):
            replica, needed = requirements[pending.cursor]
            if self._applied.get(replica, 0) < needed:
                return replica, needed
            pending.cursor += 1
        return None

    def _wait(self, pending: _Pending, blocker: tuple[str, int]) -> None:
        replica, needed = blocker
        heapq.heappush(self._waiting[replica], (needed, pending.delta.origin, pending.delta.seq))

    def _unbuffer(self, key: tuple[str, int]) -> _Pending:
        pending = self._buffer.pop(key)
        self._buffered_bytes -= pending.size
        return pending

    def _deliver_cascade(self, first: Delta) -> list[Delta]:
        """Deliver ``first`` (deliverable, not buffered), then every buffered delta it unblocks."""
        out: list[Delta] = []
        ready = [first]
        while ready:
            delta = ready.pop()
            # Deliverable means the context (which names seq - 1 of the origin) is applied and
            # seq itself is not: so this is exactly the next seq of its origin.
            self._applied[delta.origin] = delta.seq
            self._outstanding -= 1
            self._delivered += 1
            out.append(delta)
            heap = self._waiting.get(delta.origin)
            while heap and heap[0][0] <= delta.seq:
                _, origin, seq = heapq.heappop(heap)
                pending = self._buffer.get((origin, seq))
                if pending is None:
                    continue
                blocker = self._first_unmet(pending)
                if blocker is None:
                    self._unbuffer((origin, seq))
                    ready.append(pending.delta)
                else:
                    self._wait(pending, blocker)
            if heap is not None and not heap:
                del self._waiting[delta.origin]
        return out

    def _reject_deadlocked(self) -> None:
        """Discard the buffer if every delta in it waits only on others in it.

        After delivery has run to a fixpoint, buffered deltas remain while no known seq is
        missing only if their contexts form a cycle (a waits on b waits on a): impossible in an
        honest history, and they would otherwise wait forever. Their seqs stay known, so they
        show up as gaps and are pulled again, perhaps from an honest peer.
        """
        if not self._buffer or self._outstanding > len(self._buffer):
            return
        self._rejected += len(self._buffer)
        self._buffer.clear()
        self._buffered_bytes = 0
        self._waiting.clear()
