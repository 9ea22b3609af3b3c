"""The CPU cost of one call on the wire: cronclock's send path beside a plain httpx send.

Run: python bench/wire.py [--calls 2000] [--repeats 5]

cronclock's path (issue 15): a client whose every socket operation is bounded by the call's
deadline, the answer streamed and at most a prefix read. The peer: the same pre-built request
through a default httpx.Client, `send()` reading the whole answer (the path before issue 15).
Both against one loopback target, keep-alive, one thread, interleaved runs; CPU time per call
(process time, so other load on the machine does not count).
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import structlog
from _target import BenchTarget
from pydantic import SecretStr

from schedule_grammar import parse
from services.scheduler.clock import SystemClock
from services.scheduler.config import Job
from services.scheduler.dispatch import Dispatcher
from services.scheduler.stores.memory import MemoryStateStore


class _Quiet:
    def report(self, error: BaseException, properties: dict[str, object]) -> None:
        return None

    def close(self) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    target = BenchTarget()
    job = Job(name="w", schedule=parse("every 1m"), endpoint="/w", timeout=10.0)
    dispatcher = Dispatcher(api_url=target.url, token=SecretStr("t"), store=MemoryStateStore(),
                            clock=SystemClock(), log=structlog.get_logger(), reporter=_Quiet(),
                            max_concurrency=1)  # fmt: skip
    plain = httpx.Client()
    url = dispatcher.url(job)

    def ours() -> None:
        request = dispatcher._client.build_request("POST", url, timeout=job.timeout)
        dispatcher._send(job, request)

    def peer() -> None:
        request = plain.build_request("POST", url, timeout=job.timeout)
        plain.send(request).close()

    results: dict[str, list[float]] = {"cronclock _send": [], "httpx send": []}
    for _ in range(args.repeats):
        for name, call in (("cronclock _send", ours), ("httpx send", peer)):
            for _ in range(50):
                call()  # warm the connection and caches
            begun = time.process_time()
            for _ in range(args.calls):
                call()
            results[name].append((time.process_time() - begun) / args.calls * 1e6)
    for name, values in results.items():
        print(f"{name:18} {statistics.median(values):7.1f} µs CPU per call "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)})")  # fmt: skip
    ratio = statistics.median(results["cronclock _send"]) / statistics.median(results["httpx send"])
    print(f"ratio: {ratio:.2f}x")
    dispatcher.shutdown(0)
    plain.close()
    target.stop()


if __name__ == "__main__":
    main()
