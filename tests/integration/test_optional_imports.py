"""Issue 19: back-end clients and the admin stack load only when used. `redis` is the extra
`cronclock[redis]`, `psycopg` the extra `cronclock[postgres]`: without one, its state URL is a
config error naming the extra, and everything else runs as before. Shown on the real daemon with the package hidden
(a sitecustomize that sets sys.modules["redis"] = None, as a missing package looks)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Daemon, base_env, run_cli
from tests.support import Target

TICK = '[jobs.tick]\nschedule = "every 1s"\nendpoint = "/tick"\n'


@pytest.fixture
def without_redis(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH for a process in which the redis package is not installed."""
    hidden = tmp_path / "no-redis"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text('import sys\nsys.modules["redis"] = None\n')
    return {"PYTHONPATH": f"{hidden}:{ROOT}:{ROOT / 'src'}"}


@pytest.mark.parametrize("hidden", ["psycopg", "psycopg_pool"])
def test_a_postgres_url_without_the_extra_is_one_line_naming_it(
    hidden: str, tmp_path: Path, jobs_file: Callable[[str], Path]
) -> None:
    directory = tmp_path / "no-psycopg"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(f'import sys\nsys.modules["{hidden}"] = None\n')
    env = base_env(API_URL="http://127.0.0.1:9", SCHEDULER_API_TOKEN="t",
                   SCHEDULER_STATE_URL="postgresql://cronclock@127.0.0.1:5999/app",
                   SCHEDULER_JOBS_FILE=str(jobs_file(TICK)),
                   PYTHONPATH=f"{directory}:{ROOT}:{ROOT / 'src'}")  # fmt: skip
    for command in ("check", "run"):
        result = run_cli(command, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "SCHEDULER_STATE_URL" in result.stderr
        assert "pip install 'cronclock[postgres]'" in result.stderr


def test_a_redis_url_without_the_extra_is_one_line_naming_it(
    without_redis: dict[str, str], jobs_file: Callable[[str], Path]
) -> None:
    env = base_env(API_URL="http://127.0.0.1:9", SCHEDULER_API_TOKEN="t",
                   SCHEDULER_STATE_URL="redis://127.0.0.1:6399/0",
                   SCHEDULER_JOBS_FILE=str(jobs_file(TICK)), **without_redis)  # fmt: skip
    for command in ("check", "run"):
        result = run_cli(command, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "SCHEDULER_STATE_URL" in result.stderr
        assert "pip install 'cronclock[redis]'" in result.stderr


def test_the_daemon_fires_on_sqlite_without_the_redis_package(
    without_redis: dict[str, str],
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN="t",
                  SCHEDULER_STATE_URL=f"sqlite:///{tmp_path}/state.db",
                  SCHEDULER_ADMIN_BIND="127.0.0.1:0",
                  SCHEDULER_JOBS_FILE=str(jobs_file(TICK)), **without_redis)  # fmt: skip
    assert target.wait_for(lambda calls: len(calls) >= 2), proc.log_path.read_text()
    assert proc.stop() == 0


def _loaded_after(
    argv: list[str],
    env: dict[str, str],
    *,
    stop_after: float | None = None,
    also: tuple[str, ...] = (),
) -> str:
    """Which heavy packages a process that ran `main(argv)` had imported when it ended."""
    stop = (f"import os, signal, threading\n"
            f"threading.Timer({stop_after}, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
            if stop_after else "")  # fmt: skip
    probe = (
        f"import sys\n{stop}from services.scheduler.__main__ import main\n"
        f"code = main({argv!r})\n"
        f"heavy = ('fastapi', 'uvicorn', 'starlette', 'redis', 'psycopg', 'posthog', "
        f"'prometheus_client', 'opentelemetry', *{also!r})\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
        "raise SystemExit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


# httpx is imported by `check` and `next JOB` (API_URL is validated by the parser the calls are
# built with, so what `check` accepts is what the dispatcher can send), not by `next --schedule`.
@pytest.mark.parametrize(
    "argv", [["check"], ["next", "-n", "1"], ["next", "--schedule", "every 1m"]]
)
def test_check_and_next_import_no_admin_stack_redis_posthog_or_metrics(argv: list[str]) -> None:
    assert _loaded_after(argv, base_env(SCHEDULER_API_TOKEN="t")) == "LOADED []"


def test_next_schedule_imports_no_http_client_either() -> None:
    loaded = _loaded_after(["next", "--schedule", "every 1m"], base_env(), also=("httpx",))
    assert loaded == "LOADED []"


def test_the_daemon_without_admin_api_or_posthog_imports_neither_nor_redis(
    target: Target, jobs_file: Callable[[str], Path]
) -> None:
    env = base_env(API_URL=target.url, SCHEDULER_API_TOKEN="t", SCHEDULER_ADMIN_BIND="off",
                   SCHEDULER_JOBS_FILE=str(jobs_file(TICK)))  # fmt: skip
    assert _loaded_after(["run"], env, stop_after=2.5) == "LOADED ['prometheus_client']"
    assert target.calls("/tick"), "the daemon fired while it ran"
