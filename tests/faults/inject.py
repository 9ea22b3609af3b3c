"""Runs the real daemon with one fault injected, for tests/faults and bench/chaos.py:

    python -m tests.faults.inject writer-dies

`writer-dies`: the SQLite writer thread meets an unexpected error (as an out-of-range integer
bound to a statement once did) after a few commits.
"""

from __future__ import annotations

import sys

from services.scheduler.signals import ProcessSignals

signals = ProcessSignals.install()  # as `python -m services.scheduler` does, first thing


def _writer_dies() -> None:
    from services.scheduler.stores import sqlite as state

    original = state.SqliteStateStore._commit
    commits = {"n": 0}

    def commit(self: state.SqliteStateStore, statements: list[state.Statement]) -> bool:
        commits["n"] += 1
        if commits["n"] > 5:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return original(self, statements)

    state.SqliteStateStore._commit = commit  # type: ignore[method-assign]


FAULTS = {"writer-dies": _writer_dies}

if __name__ == "__main__":
    FAULTS[sys.argv[1]]()
    from services.scheduler.__main__ import main

    sys.exit(main(["run"], signals=signals))
