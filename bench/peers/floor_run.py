"""The machine's floor for bench/lateness.py: a minimal raw-socket sender, no scheduler at all.

python bench/peers/floor_run.py URL JOBS CADENCE_SECONDS CONNECTIONS DURATION
At every multiple of CADENCE it writes JOBS prepared requests (bytes built ahead) over
CONNECTIONS keep-alive sockets, one at a time per socket, the next as soon as an answer is
read, multiplexed with `selectors` in one thread: what any Python sender could at best do.
"""

from __future__ import annotations

import selectors
import socket
import sys
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit


def request(host: str, slot: float, job: int) -> bytes:
    stamp = datetime.fromtimestamp(slot, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return (f"POST /bench HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            f"X-Scheduled-For: {stamp}\r\nX-Scheduler-Job: job-{job}\r\n\r\n").encode()  # fmt: skip


def main() -> None:
    url, jobs, cadence, connections, duration = (
        sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5]))  # fmt: skip
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sockets = [socket.create_connection((host, port)) for _ in range(connections)]
    for sock in sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    end = time.time() + duration
    while True:
        now = time.time()
        slot = now - now % cadence + cadence
        if slot > end:
            break
        queue = [request(f"{host}:{port}", slot, job) for job in range(jobs)]  # built ahead
        queue.reverse()
        time.sleep(max(0.0, slot - time.time() - 0.002))
        while time.time() < slot:
            pass
        busy = 0
        for sock in sockets:
            if queue:
                sock.sendall(queue.pop())
                busy += 1
        while busy:
            for key, _ in selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(65536)  # the target's answer is one small segment
                assert data.endswith(b"\r\n\r\n"), data
                if queue:
                    sock.sendall(queue.pop())
                else:
                    busy -= 1
    for sock in sockets:
        sock.close()


if __name__ == "__main__":
    main()
