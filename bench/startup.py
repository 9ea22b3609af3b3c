"""Start-up cost of the command line, beside `python -c pass` (issue 19), and how soon the
daemon's signal handlers are installed (issue 18).

Run: python bench/startup.py [--repeats N]
Each command runs as a fresh process N times (default 10); the median wall time is reported.
The environment is clean (no SCHEDULER_* of the caller) with a token and an in-memory state.
Handlers: the daemon is sent SIGTERM D ms after spawn, for D = 2, 4, 6 ... ms, N times each;
before its handlers are installed SIGTERM kills it (-15), after them it starts and stops
cleanly (exit 0). The figure is the smallest D at which every run exited 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    ("python -c pass (the floor)", ["-c", "pass"]),
    ("--version", ["-m", "services.scheduler", "--version"]),
    ("check (built-in table)", ["-m", "services.scheduler", "check"]),
    ("next -n 1 (built-in table)", ["-m", "services.scheduler", "next", "-n", "1"]),
    ("next --schedule 'every 1m'", ["-m", "services.scheduler", "next", "--schedule", "every 1m"]),
]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "API_URL"))}
    env |= {"SCHEDULER_API_TOKEN": "bench", "SCHEDULER_STATE_URL": "memory://"}
    return env


def once(args: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - began


def handled_after(delay: float, env: dict[str, str]) -> bool:
    """Whether the daemon, sent SIGTERM `delay` s after spawn, stopped by its own handler."""
    process = subprocess.Popen([sys.executable, "-m", "services.scheduler", "run"], env=env,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    return process.wait(30) == 0


def handlers_installed(env: dict[str, str], repeats: int) -> float | None:
    daemon_env = env | {"SCHEDULER_ADMIN_BIND": "off", "API_URL": "http://127.0.0.1:9"}
    for step in range(1, 101):
        delay = step * 0.002
        if all(handled_after(delay, daemon_env) for _ in range(repeats)):
            return delay
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    env = environment()
    print(f"python {platform.python_version()} on {platform.machine()}, median of {args.repeats}")
    floor = None
    for label, command in COMMANDS:
        once(command, env)  # warm the page cache and the bytecode
        median = statistics.median(once(command, env) for _ in range(args.repeats))
        floor = floor or median
        print(f"{label:<32}{median * 1000:>8.0f} ms{median / floor:>8.1f}x the floor")
    installed = handlers_installed(env, args.repeats)
    shown = f"{installed * 1000:.0f} ms" if installed is not None else "not within 200 ms"
    print(
        f"{'spawn -> signal handlers':<32}{shown:>11}  (every one of {args.repeats} runs "
        "sent SIGTERM then exited 0)"
    )


if __name__ == "__main__":
    main()
