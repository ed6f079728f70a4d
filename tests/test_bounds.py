"""Small bounded helpers: early cancels, throttled log lines, restart backoff."""

from __future__ import annotations

import logging
import time

from pdserve.cancels import EarlyCancels
from pdserve.supervisor import RestartPolicy
from pdserve.throttled_log import ThrottledLog, clip


def test_early_cancels_are_taken_once_and_bounded_in_number_and_time():
    cancels = EarlyCancels(keep_s=0.05, max_entries=3)
    cancels.remember("a")
    assert cancels.take("a") and not cancels.take("a")
    for i in range(10):
        cancels.remember(f"r{i}")
    assert len(cancels) == 3 and cancels.take("r9") and not cancels.take("r0")
    time.sleep(0.06)
    assert not cancels.take("r8")


def test_throttled_log_lets_a_burst_through_then_counts(caplog):
    log = ThrottledLog(logging.getLogger("t"), burst=3, period_s=0.05)
    with caplog.at_level(logging.WARNING, logger="t"):
        written = [log.warning("refused %s", "x" * 1000) for _ in range(10)]
        time.sleep(0.06)
        log.warning("again %s", "y")
    assert written == [True] * 3 + [False] * 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(len(line) < 200 for line in lines)
    assert "7 similar lines held back" in lines[-1]
    assert clip("abc", 2) == "ab...(+1 chars)"


def test_restart_backoff_doubles_up_to_its_cap():
    policy = RestartPolicy(first_backoff_s=0.5, max_backoff_s=8.0)
    assert [policy.backoff_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
