"""deploy/prometheus/alerts.yml and deploy/grafana/cronclock.json: the rules pass promtool's
check and their unit tests (deploy/prometheus/alerts.test.yml), every alert has a test, every
metric and label a rule or a panel queries is one the daemon exports, every dashboard query
is valid PromQL (promtool parses it as a rule), and the runbooks point at README sections."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.scheduler.telemetry import Metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "cronclock.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package prometheus; .ci/run installs it)",
)


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def exported() -> dict[str, set[str]]:
    """Every series name the daemon exports, with its label names (Prometheus renames the
    metrics' own `job` label to `exported_job` and adds `job` and `instance`)."""
    names: dict[str, set[str]] = {"up": {"job", "instance"}}
    for family in Metrics().registry.collect():
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        # label names of families with no sample yet (labelled, unused) come from the metric
        metric = Metrics().registry._names_to_collectors.get(family.name)
        labels |= set(getattr(metric, "_labelnames", ()))
        labels = {"exported_job" if label == "job" else label for label in labels}
        labels |= {"job", "instance"}
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",)}.get(family.type, ("",))  # fmt: skip
        for suffix in suffixes:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and",
                 "unless", "offset", "bool"}  # fmt: skip


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names) of every selector in `expr`, and the labels of by (...) clauses."""
    found = []
    for match in re.finditer(r"\b(cronclock_[a-z_]+|up)\b(\{([^}]*)\})?", expr):
        labels = {part.split("=")[0].strip(" !~") for part in (match[3] or "").split(",")
                  if part.strip()}  # fmt: skip
        found.append((match[1], labels))
    grouped = set()
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped |= {label.strip() for label in clause.split(",") if label.strip()}
    return [*found, ("", grouped - _PROMQL_WORDS)]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_and_label_queried_is_one_the_daemon_exports(source: str) -> None:
    known = exported()
    exprs = [rule["expr"] for rule in rules()] if source == "alerts" else dashboard_queries()
    assert exprs
    for expr in exprs:
        found = selectors(expr)
        metrics = [name for name, _ in found if name]
        assert metrics, expr
        every_label = set().union(*(known[name] for name in metrics if name in known))
        for name, labels in found:
            if name:
                assert name in known, f"{name} is not exported: {expr}"
                assert labels <= known[name], f"{name} has no {labels - known[name]}: {expr}"
            else:
                assert labels <= every_label | {"le"}, f"grouped by unknown {labels}: {expr}"


def test_every_alert_is_unit_tested_and_says_what_to_do() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    names = [rule["alert"] for rule in rules()]
    assert set(names) == tested
    assert set(names) >= {"CronclockDown", "CronclockNoLeader", "CronclockJobFailing",
                          "CronclockJobStale", "CronclockJobAutoPaused", "CronclockMissedSlots",
                          "CronclockLatenessHigh"}  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    anchors = {_anchor(line) for line in readme.splitlines() if line.startswith("#")}
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        where, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (ROOT / where).exists(), rule["annotations"]["runbook"]
        if where == "README.md":
            assert anchor in anchors, f"README has no section #{anchor}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    tests = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    queries = dashboard_queries()
    values = {"$job": "cronclock", "$instance": ".*", "${datasource}": "x"}
    recorded = []
    for n, query in enumerate(queries):
        for variable, value in values.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        recorded.append({"record": f"cronclock:panel_{n}", "expr": query})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": recorded}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                           text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_dashboard_is_importable() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "cronclock" and board["title"] == "cronclock"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
    titles = {panel["title"] for panel in board["panels"]}
    assert {"Runs by outcome", "Lateness (send time minus slot)", "Next runs", "Calls in flight",
            "Leader"} <= titles  # fmt: skip
