"""Where a fire's CPU goes: the daemon's CPU time per thread, per call, at N jobs every second.

Run: python bench/threads.py [--jobs 100] [--seconds 15] [--signed] [--otel]
     (needs py-spy for thread names; --signed: every call signed, SCHEDULER_SIGNING_SECRET;
     --otel: every attempt exported as a span to a loopback OTLP/HTTP sink)

The daemon runs as in bench/lateness.py (SQLite state, the fast path); each thread's CPU time
is read from /proc/<pid>/task/<tid>/schedstat (nanoseconds) before and after, and divided by
the calls the target received meanwhile. Thread names come from `py-spy dump` when installed.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _target import BenchTarget
from lateness import Cronclock, thread_cpu_seconds


def names(pid: int) -> dict[str, str]:
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    return dict(re.findall(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump))


def otlp_sink() -> str:
    """A loopback OTLP/HTTP endpoint that answers 200 and keeps nothing."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--signed", action="store_true", help="sign every call (Standard Webhooks)")
    parser.add_argument("--otel", action="store_true", help="export spans (OTLP/HTTP, loopback)")
    args = parser.parse_args()
    target = BenchTarget()
    secret = "whsec_" + base64.b64encode(b"bench-signing-key-32-bytes-long!").decode()
    extra = {"SCHEDULER_SIGNING_SECRET": secret} if args.signed else {}
    if args.otel:
        extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_sink()
    daemon = Cronclock(target, args.jobs, "every 1s", "sqlite", extra_env=extra)
    time.sleep(3)
    pid = daemon.process.pid
    called = names(pid)
    before, calls = thread_cpu_seconds(pid), len(target.arrivals)
    time.sleep(args.seconds)
    after, calls = thread_cpu_seconds(pid), len(target.arrivals) - calls
    daemon.stop()
    print(f"{args.jobs} jobs every 1 s, {args.seconds:g} s, {calls} calls")
    total = 0.0
    for tid, used in sorted(after.items(), key=lambda item: before.get(item[0], 0) - item[1]):
        spent = used - before.get(tid, 0.0)
        total += spent
        print(
            f"  {called.get(tid, tid):14} {spent * 1000:8.1f} ms  {spent / max(calls, 1) * 1e6:6.0f} µs/fire"
        )
    print(f"  {'all':14} {total * 1000:8.1f} ms  {total / max(calls, 1) * 1e6:6.0f} µs/fire")
    target.stop()


if __name__ == "__main__":
    main()
