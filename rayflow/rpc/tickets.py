"""The server's in-memory store of TLS session tickets, which lets clients resume with 0-RTT.

Why single use: a ticket is removed when a client presents it, so a captured ClientHello with its
0-RTT data cannot be resumed a second time against this server (the client receives a fresh ticket
on every connection). Early data is still only trusted for idempotent ops (see
:mod:`rayflow.rpc.dispatch`); single use narrows the replay window further. Tickets expire after
``ttl_s`` and the store keeps at most ``max_tickets``, dropping the oldest first, so a client that
reconnects in a loop cannot grow it. Kept in memory only: a restarted server simply falls back to
full handshakes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from aioquic.tls import SessionTicket

DEFAULT_TICKET_TTL_S = 3600.0
DEFAULT_MAX_TICKETS = 10_000


class SessionTicketStore:
    """Tickets issued by this server, by ticket label, each used at most once."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TICKET_TTL_S,
        max_tickets: int = DEFAULT_MAX_TICKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_tickets < 1:
            raise ValueError("ttl_s and max_tickets must be positive")
        self.ttl_s = ttl_s
        self.max_tickets = max_tickets
        self._clock = clock
        self._tickets: OrderedDict[bytes, tuple[float, SessionTicket]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: SessionTicket) -> None:
        """Remember a ticket the TLS layer just issued (aioquic's session_ticket_handler)."""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            self._tickets[ticket.ticket] = (now + self.ttl_s, ticket)
            self._tickets.move_to_end(ticket.ticket)
            while len(self._tickets) > self.max_tickets:
                self._tickets.popitem(last=False)

    def pop(self, label: bytes) -> SessionTicket | None:
        """The ticket a client presents, removed so it cannot be used again (session_ticket_fetcher)."""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            entry = self._tickets.pop(label, None)
        return None if entry is None else entry[1]

    def _drop_expired(self, now: float) -> None:
        # Insertion order is expiry order (constant ttl), so expired tickets are at the front.
        while self._tickets:
            label, (expires_at, _) = next(iter(self._tickets.items()))
            if expires_at > now:
                return
            del self._tickets[label]
