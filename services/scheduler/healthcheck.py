"""`python -m services.scheduler.healthcheck`: the image's health check. It asks `/healthz` of
the admin API where SCHEDULER_ADMIN_BIND says the daemon listens, so a changed port is followed.
Standard library only (it runs every 30 s): exit 0 when the daemon answers 200, else 1."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_BIND = "127.0.0.1:8089"  # Settings.admin_bind's default (tests/test_deploy.py checks)


def local_url(bind: str) -> str:
    """The URL a process on this host reaches an admin API bound to `bind` at."""
    host, _, port = bind.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host).strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main() -> int:
    bind = os.environ.get("SCHEDULER_ADMIN_BIND", DEFAULT_BIND).strip()
    if bind.lower() == "off":
        print("SCHEDULER_ADMIN_BIND=off: no /healthz to ask; reporting healthy")
        return 0
    url = f"{local_url(bind)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as answer:
            print(f"{url}: {answer.status}")
            return 0
    except urllib.error.HTTPError as error:  # 503: the loop stalled, state or a thread is gone
        print(f"{url}: {error.code} {error.read(500).decode(errors='replace')}", file=sys.stderr)
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
