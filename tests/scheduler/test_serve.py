"""serve(): the process's exit status tells a supervisor whether the loop died."""

from __future__ import annotations

import pytest
import structlog

from services.scheduler.__main__ import serve
from services.scheduler.clock import SystemClock
from services.scheduler.config import load_config
from services.scheduler.stores.memory import MemoryStateStore


def test_a_loop_that_dies_makes_the_process_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: MemoryStateStore, now: object) -> list[object]:
        raise RuntimeError("state unreadable")

    monkeypatch.setattr(MemoryStateStore, "recover_interrupted", broken)
    config = load_config(
        {
            "LOCAL_DEV_MODE": "true",
            "SCHEDULER_STATE_URL": "memory://",
            "SCHEDULER_ADMIN_BIND": "off",
        }
    )
    assert serve(config, log=structlog.get_logger(), clock=SystemClock(), stop_after=5) == 1


def test_a_clean_stop_exits_0() -> None:
    config = load_config(
        {
            "LOCAL_DEV_MODE": "true",
            "SCHEDULER_STATE_URL": "memory://",
            "SCHEDULER_ADMIN_BIND": "off",
        }
    )
    assert serve(config, log=structlog.get_logger(), clock=SystemClock(), stop_after=0.3) == 0
