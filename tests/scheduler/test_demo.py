"""The demo's output: every line of the daemon's log and of its application goes out whole, in
one write (a real CI run once showed a log line and an application line glued together)."""

from __future__ import annotations

import threading

from services.scheduler.demo import WholeLines, whole_line


class Writes:
    """A stream that records each write it is given."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False


def test_print_writes_a_line_and_its_newline_apart_which_whole_lines_joins() -> None:
    raw = Writes()
    print("fired job=demo-tick", file=raw, flush=True)  # type: ignore[arg-type]
    assert raw.writes == ["fired job=demo-tick", "\n"]  # why a line could be split
    joined = Writes()
    stream = WholeLines(joined)  # type: ignore[arg-type]
    print("fired job=demo-tick", file=stream, flush=True)
    stream.write("two\nlines\npart")
    assert joined.writes == ["fired job=demo-tick\n", "two\n", "lines\n"]
    stream.write("ial\n")
    assert joined.writes[-1] == "partial\n"


def test_threads_writing_both_streams_never_split_a_line() -> None:
    shared = Writes()  # stdout and stderr on one terminal
    log = WholeLines(shared)  # type: ignore[arg-type]

    def daemon() -> None:
        for n in range(300):
            print(f"log line {n}", file=log, flush=True)

    def application() -> None:
        for n in range(300):
            whole_line(f"demo app <- {n}", shared)  # type: ignore[arg-type]

    threads = [threading.Thread(target=t) for t in (daemon, application, daemon, application)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(shared.writes) == 1200
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in shared.writes)
