"""On PYTHONPATH, hides uvloop from the daemon (bench/lateness.py's `cronclock-asyncio`), so the
fast path runs on asyncio's own loop in the same virtualenv: both loops measured in one run."""

import sys

sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` raises ImportError
