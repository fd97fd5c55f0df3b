"""The server's session ticket store: single use, expiry, bounded size."""

import datetime

import pytest
from aioquic.tls import CipherSuite, SessionTicket

from rayflow.rpc.tickets import SessionTicketStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ticket(label: bytes) -> SessionTicket:
    now = datetime.datetime.now(datetime.timezone.utc)
    return SessionTicket(
        age_add=0,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(days=1),
        not_valid_before=now,
        resumption_secret=b"s" * 32,
        server_name="localhost",
        ticket=label,
    )


def test_ticket_is_found_once_then_gone():
    store = SessionTicketStore(clock=FakeClock())
    ticket = _ticket(b"a")
    store.add(ticket)
    assert store.pop(b"a") is ticket
    assert store.pop(b"a") is None


def test_unknown_label_finds_nothing():
    store = SessionTicketStore(clock=FakeClock())
    assert store.pop(b"never issued") is None


def test_ticket_expires_after_its_ttl():
    clock = FakeClock()
    store = SessionTicketStore(ttl_s=60, clock=clock)
    store.add(_ticket(b"a"))
    clock.now += 60
    assert store.pop(b"a") is None
    assert len(store) == 0


def test_store_drops_the_oldest_tickets_beyond_its_size():
    store = SessionTicketStore(max_tickets=2, clock=FakeClock())
    for label in (b"a", b"b", b"c"):
        store.add(_ticket(label))
    assert len(store) == 2
    assert store.pop(b"a") is None and store.pop(b"c") is not None


def test_nonsensical_limits_are_rejected():
    with pytest.raises(ValueError):
        SessionTicketStore(ttl_s=0)
