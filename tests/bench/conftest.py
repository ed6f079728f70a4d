"""A `pdserve up --engine mock` for the bench smoke tests, started and owned as tests/e2e does it."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import PdserveUp, free_port


@pytest.fixture(scope="module")
def system_1p1d(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_up")
    up = PdserveUp(tmp, free_port())
    try:
        up.wait_ready(1, 1)
        yield up
    finally:
        up.stop()
        left = up.kill_leftovers()
        assert not left, f"processes left after pdserve up stopped: {left}"
