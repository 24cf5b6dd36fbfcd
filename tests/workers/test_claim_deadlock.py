"""A job's claim that PostgreSQL aborts as a deadlock's victim is tried again (workers.supervise._claim_retrying):
the replay tests found the first replay's claim deadlocking with the next replay's submission, its message spent
and the job queued for good."""
from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from workers import supervise


def deadlock() -> OperationalError:
    return OperationalError("UPDATE jobs SET status=...", {}, Exception("deadlock detected\nDETAIL: Process 1 waits"))


def test_a_deadlocked_claim_is_tried_again_and_other_errors_are_not(monkeypatch):
    monkeypatch.setattr(supervise.time, "sleep", lambda _s: None)
    calls = []

    def claim(job_id, store, settings, node=None):
        calls.append(job_id)
        if len(calls) == 1:
            raise deadlock()
        return "claimed"

    monkeypatch.setattr(supervise, "_claim", claim)
    assert supervise._claim_retrying("j1", None, None) == "claimed" and calls == ["j1", "j1"]

    def always(job_id, store, settings, node=None):
        calls.append(job_id)
        raise deadlock()

    calls.clear()
    monkeypatch.setattr(supervise, "_claim", always)
    with pytest.raises(OperationalError):
        supervise._claim_retrying("j2", None, None)
    assert len(calls) == supervise.CLAIM_TRIES

    def other(job_id, store, settings, node=None):
        calls.append(job_id)
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    calls.clear()
    monkeypatch.setattr(supervise, "_claim", other)
    with pytest.raises(OperationalError):
        supervise._claim_retrying("j3", None, None)
    assert calls == ["j3"]  # not a deadlock: not tried again
