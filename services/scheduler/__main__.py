"""cronclock command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("cronclock: the daemon is not built yet; the schedule language is (schedule_grammar).")
    return 1


if __name__ == "__main__":
    sys.exit(main())
