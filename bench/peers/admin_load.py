"""A paced loopback load on the admin API: RATE requests per second for DURATION seconds.

python bench/peers/admin_load.py URL TOKEN RATE DURATION   (prints achieved rate and errors)
Alternates GET /api/jobs, /healthz and /metrics, the mix a dashboard and a scraper make.
"""

from __future__ import annotations

import sys
import time

import httpx


def main() -> None:
    url, token, rate, duration = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    paths = ["/api/jobs", "/healthz", "/metrics"]
    sent = errors = 0
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5
    ) as client:
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < duration:
            due = began + sent / rate
            time.sleep(max(0.0, due - time.monotonic()))  # (behind: send at once)
            try:
                if client.get(paths[sent % len(paths)]).status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            sent += 1
    print(f"sent={sent} rate={sent / elapsed:.0f}/s errors={errors}", flush=True)


if __name__ == "__main__":
    main()
