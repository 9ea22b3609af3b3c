"""The README's "Receiving calls" examples run as printed: each one, with its work stubbed,
answers a call from cronclock once and its retry from the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.scheduler.config import load_config
from tests.receiver.test_receiver import call

ROOT = Path(__file__).resolve().parents[2]


def examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Receiving calls") : text.index("### Moving from APScheduler")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("SCHEDULER_API_TOKEN", "tok")
    monkeypatch.delenv("SCHEDULER_SIGNING_SECRET", raising=False)
    source = source.replace("/var/lib/app/cronclock-keys.db", str(tmp_path / "keys.db"))
    done: list[Any] = []
    namespace: dict[str, Any] = {
        "sync_everything": lambda since: done.append(since),
        "start_report": lambda kind, slot: done.append((kind, slot)),
        "__name__": "readme_example",
    }
    exec(compile(source, "README.md", "exec"), namespace)
    namespace["done"] = done
    return namespace


def test_the_fastapi_example_answers_a_call_once_and_its_retry_from_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = run(examples()[0], tmp_path, monkeypatch)
    client = TestClient(example["app"])
    first = client.post("/api/sync/trigger", headers=call(attempt=1)[0])
    again = client.post("/api/sync/trigger", headers=call(attempt=2)[0])
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() == {"synced": "2026-11-22T03:00:00+00:00"}
    assert again.headers["Idempotent-Replayed"] == "true" and len(example["done"]) == 1
    assert client.post("/api/sync/trigger", headers=call(token="x")[0]).status_code == 401


def test_the_flask_example_answers_a_call_once_and_its_retry_from_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = run(examples()[1], tmp_path, monkeypatch)
    client = example["app"].test_client()
    answers = [client.post("/api/reports/weekly", headers=call(attempt=n)[0]) for n in (1, 2)]
    assert [(a.status_code, a.json) for a in answers] == [(202, {"report": "weekly"})] * 2
    assert len(example["done"]) == 1


def test_the_apscheduler_recipes_jobs_file_is_a_valid_job_table(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Moving from APScheduler") :]
    (jobs,) = re.findall(r"```toml\n(# jobs.toml.*?)```", section, flags=re.S)
    (tmp_path / "jobs.toml").write_text(jobs)
    config = load_config(
        {"SCHEDULER_API_TOKEN": "t", "SCHEDULER_JOBS_FILE": str(tmp_path / "jobs.toml")}
    )
    shown = {job.name: (str(job.schedule), job.overlap, job.catchup) for job in config.jobs}
    assert shown == {
        "sync": ("every 15m", "skip", "latest"),
        "cleanup": ("daily 03:00 in Asia/Makassar", "skip", "latest"),
        "weekly-report": ("weekly mon 10:00", "skip", "latest"),
        "invoices": ("monthly 1 00:00", "skip", "all"),
    }
