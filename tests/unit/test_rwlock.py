"""Behaviour of the readers-writer lock guarding the vector indexes."""

from __future__ import annotations

import threading

import pytest

from rayflow.memory.rwlock import RWLock


def _wait_until(condition, attempts: int = 5000) -> bool:
    """Poll ``condition`` for a state another thread reaches; the waits only pace the polling."""
    pause = threading.Event()
    for _ in range(attempts):
        if condition():
            return True
        pause.wait(0.001)
    return condition()


def test_many_readers_hold_the_lock_together() -> None:
    lock = RWLock()
    readers_inside: list[int] = []
    # The barrier opens only if no reader is kept out; its action runs while all three are inside.
    all_inside = threading.Barrier(3, action=lambda: readers_inside.append(lock.readers))

    def reader() -> None:
        with lock.read():
            all_inside.wait(timeout=10)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert readers_inside == [3]


def test_a_writer_keeps_readers_out() -> None:
    lock = RWLock()
    with lock.write():
        assert lock.acquire_read(timeout=0) is False


def test_a_writer_waits_for_readers_to_leave() -> None:
    lock = RWLock()
    with lock.read():
        assert lock.acquire_write(timeout=0) is False
    assert lock.acquire_write(timeout=0) is True
    lock.release_write()


def test_a_writer_keeps_other_writers_out() -> None:
    lock = RWLock()
    with lock.write():
        assert lock.acquire_write(timeout=0) is False


def test_a_waiting_writer_stops_new_readers_so_writes_do_not_starve() -> None:
    lock = RWLock()
    writer_done = threading.Event()

    def writer() -> None:
        with lock.write():
            writer_done.set()

    lock.acquire_read()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert _wait_until(lambda: lock.writers_waiting == 1)
        assert lock.acquire_read(timeout=0) is False
    finally:
        lock.release_read()
    thread.join(timeout=10)
    assert writer_done.is_set()


def test_a_writer_that_gave_up_lets_readers_in_again() -> None:
    lock = RWLock()
    with lock.read():
        assert lock.acquire_write(timeout=0) is False
        assert lock.writers_waiting == 0
        assert lock.acquire_read(timeout=0) is True
        lock.release_read()


def test_releasing_a_lock_not_held_is_an_error() -> None:
    lock = RWLock()
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()


def test_readers_never_see_a_half_done_write() -> None:
    lock = RWLock()
    state = {"first": 0, "second": 0}
    torn_reads: list[tuple[int, int]] = []
    stop = threading.Event()

    def writer() -> None:
        for value in range(1, 2001):
            with lock.write():
                state["first"] = value
                state["second"] = value

    def reader() -> None:
        while not stop.is_set():
            with lock.read():
                pair = (state["first"], state["second"])
            if pair[0] != pair[1]:
                torn_reads.append(pair)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    writer_thread = threading.Thread(target=writer)
    writer_thread.start()
    writer_thread.join(timeout=60)
    stop.set()
    for thread in readers:
        thread.join(timeout=10)
    assert state == {"first": 2000, "second": 2000}
    assert torn_reads == []


def test_an_error_inside_a_block_releases_the_lock() -> None:
    lock = RWLock()
    with pytest.raises(ValueError), lock.write():
        raise ValueError("boom")
    with pytest.raises(ValueError), lock.read():
        raise ValueError("boom")
    assert lock.acquire_write(timeout=0) is True
    lock.release_write()
