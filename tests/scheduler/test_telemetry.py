"""The log writer: every line is one whole write; inside a batch a thread's lines are written
together in one write when the batch ends (issue 18: an instant's "fired" lines)."""

from __future__ import annotations

import io
import json
import threading

from services.scheduler.telemetry import configure_logging, log_batch


class Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_each_line_is_one_write_with_its_newline() -> None:
    out = Writes()
    log = configure_logging(fmt="json", stream=out)
    log.info("one", n=1)
    log.warning("two")
    assert [json.loads(w)["event"] for w in out.writes] == ["one", "two"]
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in out.writes)


def test_a_batch_is_written_in_one_write_when_it_ends() -> None:
    out = Writes()
    log = configure_logging(fmt="json", stream=out)
    with log_batch():
        for n in range(5):
            log.info("fired", n=n)
        assert out.writes == []  # held until the batch ends
    assert len(out.writes) == 1
    assert [json.loads(line)["n"] for line in out.writes[0].splitlines()] == [0, 1, 2, 3, 4]


def test_another_threads_lines_are_not_held_by_a_batch() -> None:
    out = Writes()
    log = configure_logging(fmt="json", stream=out)
    with log_batch():
        log.info("held")
        other = threading.Thread(target=lambda: log.info("elsewhere"))
        other.start()
        other.join()
        assert [json.loads(w)["event"] for w in out.writes] == ["elsewhere"]
    assert json.loads(out.writes[1])["event"] == "held"


def test_a_batch_that_raises_still_writes_what_it_held() -> None:
    out = Writes()
    log = configure_logging(fmt="json", stream=out)
    try:
        with log_batch():
            log.error("before the failure")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [json.loads(w)["event"] for w in out.writes] == ["before the failure"]
