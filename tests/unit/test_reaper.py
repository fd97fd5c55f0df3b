"""The background reaper: jobs run, failures are retried then given up and logged, nothing is dropped."""

from __future__ import annotations

import gc
import logging
import threading

import pytest

from rayflow.sandbox.reaper import Reaper, RetryPolicy

NO_PAUSE = RetryPolicy(attempts=3, first_pause_s=0.0)


class Flaky:
    """A job that fails its first ``failures`` calls, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(f"engine busy ({self.calls})")


def test_retry_pauses_grow_then_stop_at_the_last_attempt() -> None:
    policy = RetryPolicy(attempts=4, first_pause_s=0.1, factor=2.0, max_pause_s=0.3)
    assert [policy.pause_after(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, None]


def test_flush_returns_after_every_submitted_job_ran() -> None:
    reaper = Reaper(retry=NO_PAUSE)
    ran: list[int] = []
    tickets = [reaper.submit(f"job-{i}", lambda i=i: ran.append(i)) for i in range(20)]
    assert reaper.flush(timeout_s=30)
    assert sorted(ran) == list(range(20))
    assert all(t.done and t.error is None for t in tickets)
    assert reaper.pending == 0
    reaper.close()


def test_a_failing_job_is_retried_until_it_succeeds() -> None:
    reaper = Reaper(retry=NO_PAUSE)
    job = Flaky(failures=2)
    ticket = reaper.submit("flaky", job)
    assert ticket.wait(timeout_s=30)
    assert (job.calls, ticket.failures, ticket.error) == (3, 2, None)
    reaper.close()


def test_a_job_failing_every_attempt_is_given_up_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    reaper = Reaper(retry=NO_PAUSE)
    job = Flaky(failures=100)
    with caplog.at_level(logging.ERROR, logger="rayflow.sandbox.reaper"):
        ticket = reaper.submit("doomed", job)
        assert reaper.flush(timeout_s=30)
    assert job.calls == NO_PAUSE.attempts
    assert isinstance(ticket.error, OSError)
    assert any("giving up on doomed" in r.getMessage() for r in caplog.records)
    reaper.close()


def test_a_job_waiting_for_its_retry_does_not_hold_up_the_others() -> None:
    slow_retry = RetryPolicy(attempts=2, first_pause_s=3600.0)
    reaper = Reaper(retry=slow_retry)
    reaper.submit("stuck", Flaky(failures=1))
    other = reaper.submit("fine", lambda: None)
    assert other.wait(timeout_s=30)
    assert reaper.pending == 1  # the stuck job, waiting out its hour
    reaper.close(timeout_s=0)


def test_close_finishes_queued_jobs_first() -> None:
    reaper = Reaper(retry=NO_PAUSE)
    gate = threading.Event()
    ran: list[str] = []
    reaper.submit("blocked", lambda: (gate.wait(30), ran.append("blocked")))
    reaper.submit("queued", lambda: ran.append("queued"))
    gate.set()
    assert reaper.close(timeout_s=30)
    assert ran == ["blocked", "queued"]
    assert reaper.closed


def test_a_job_after_close_runs_in_the_caller() -> None:
    reaper = Reaper(retry=NO_PAUSE)
    reaper.close()
    caller: list[threading.Thread] = []
    ticket = reaper.submit("late", lambda: caller.append(threading.current_thread()))
    assert ticket.done and caller == [threading.current_thread()]


def test_a_collected_reaper_still_finishes_its_jobs() -> None:
    reaper = Reaper(retry=NO_PAUSE)
    gate = threading.Event()
    ran: list[str] = []
    ticket = reaper.submit("queued", lambda: (gate.wait(30), ran.append("done")))
    gate.set()
    del reaper
    gc.collect()
    assert ticket.wait(timeout_s=30)
    assert ran == ["done"]


def test_a_reaper_needs_a_worker() -> None:
    with pytest.raises(ValueError):
        Reaper(workers=0)
