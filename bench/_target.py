"""A lean loopback HTTP/1.1 target for benchmarks: records arrival time and slot per call.

asyncio, keep-alive, no framework: the target must cost far less than what it measures.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # time.time() when the request head was read
    scheduled: float  # X-Scheduled-For as a POSIX timestamp
    job: str
    fencing: int = 0  # X-Scheduler-Fencing-Token (Redis coordination), 0 when absent


class BenchTarget:
    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=2048)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                at = time.time()
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                scheduled = headers.get("x-scheduled-for")
                if scheduled:
                    slot = datetime.fromisoformat(scheduled.replace("Z", "+00:00")).timestamp()
                    self.arrivals.append(
                        Arrival(
                            at,
                            slot,
                            headers.get("x-scheduler-job", ""),
                            int(headers.get("x-scheduler-fencing-token", "0") or 0),
                        )
                    )
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def reset(self) -> None:
        self.arrivals = []

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of lateness in milliseconds."""
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "p50": statistics.median(ordered) * 1000,
        "p99": p99 * 1000,
        "max": ordered[-1] * 1000,
    }
