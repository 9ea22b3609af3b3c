"""Pools of good and bad values for every setting and job field (issue 16's proof).

Each pool mixes values that must work with values seen to break things: non-finite and huge
numbers, wrong types, non-ASCII and control characters, secrets in the wrong place. Every
secret-looking value contains SECRET, so a test can check that no output ever shows one.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

SECRET = "hunter2"
OMIT = object()  # the field or variable is not given
TARGET = "{target}"  # replaced by the loopback target's URL

NAN, INF = float("nan"), float("inf")

# field -> (good values, bad values). A configuration made of good values only must pass
# `check` and fire (except for the two combinations `refused` names); one bad value must not.
JOB_FIELDS: dict[str, tuple[list[Any], list[Any]]] = {
    "schedule": (["every 1m", "every 1s", "daily 03:00", "cron */5 * * * *", "mon 10:00",
                  "at 2030-01-01T00:00", "every 1h in America/New_York",
                  "cron 0 30 2 * * * in Europe/Berlin", "monthly last 18:00 in Pacific/Chatham"],
                 ["every \uff11\uff15m", "daily 03:00 in Europe/Berlin in Asia/Tokyo",
                  "daily 03:00 dst=skip dst=last", "*/5 * * * *", "every " + "9" * 30 + "s",
                  "every 1x", "", 5, True]),
    "endpoint": (["/x", "/api/a?b=c", "/a/b.json", "/\u00e9"],  # httpx percent-encodes it
                 ["http://evil/x", "/../x", "", 7, "/x y", "//evil/x"]),
    "method": ([OMIT, "POST", "get", "DELETE"], ["FETCH", 1]),
    "timeout": ([OMIT, "5s", 0.5, 86400, "10ms"],
                [1e-300, "99999999999d", NAN, INF, -1, True, "0", 0]),
    "timezone": ([OMIT, "UTC", "Europe/Berlin", "pacific/chatham"],
                 ["", "Nope", "Berlin", "a/" * 300, "__init__/x", 3]),
    "headers": ([OMIT, {}, {"X-A": "b"}, {"X-Tab": "a\tb c"}],
                [{"X-A": SECRET + "\u00e9"}, {"X-A": "a\r\nX-B: " + SECRET}, {"Host": SECRET},
                 {"Content-Length": "1"}, {"Transfer-Encoding": "chunked"},
                 {"Authorization": SECRET}, {"bad name": SECRET}, {"X-A": 1}, "not a table"]),
    "body": ([OMIT, {"a": 1}, [1, "two", 3.5], "text", 10**30,
              {"deep": json.loads("[" * 20 + "]" * 20)}],
             [NAN, {"x": NAN}, [INF], {"x": -INF}, json.loads("[" * 40 + "]" * 40)]),
    "enabled": ([OMIT, True, False], ["yes", 1]),
    "overlap": ([OMIT, "skip", "QUEUE", "allow"], ["sometimes", 1]),
    "retries": ([OMIT, 0, 3, 20], [21, -1, True, 1.5, "2"]),
    "catchup": ([OMIT, "latest", "all", "none"], ["never"]),
    "misfire_grace": ([OMIT, "5m", 0, "30d"], [INF, 1e308, "99999999999d", -1, "31d"]),
    "spread": ([OMIT, False, False, True], ["true"]),
    "run_on_start": ([OMIT, True, False], [1]),
    "dst_gap": ([OMIT, "skip", "shift"], ["later"]),
    "dst_repeat": ([OMIT, "both", "LAST"], [3]),
    "colour": ([OMIT], ["blue"]),  # a field no job has
}  # fmt: skip

SETTINGS: dict[str, tuple[list[Any], list[Any]]] = {
    "API_URL": ([TARGET],
                [f"http://user:{SECRET}@127.0.0.1:1", f"http://{SECRET}@127.0.0.1:1",
                 "http://app:99999", "http://a b:1", "ftp://x", ""]),
    "SCHEDULER_API_TOKEN": ([SECRET + "tok", SECRET + "tok", SECRET + "tok", "", OMIT],
                            [f"{SECRET}\n1", f"{SECRET} x", SECRET + "\u00e9", f"{SECRET}\r\nX: 1"]),
    "SCHEDULER_SIGNING_SECRET": ([OMIT, "whsec_" + base64.b64encode(SECRET.encode() * 3).decode()],
                                 [SECRET, f"whsec_{SECRET}%", "whsec_" + base64.b64encode(b"k").decode()]),
    "LOCAL_DEV_MODE": ([OMIT, "true", "false"], ["maybe"]),
    "SCHEDULER_TIMEZONE": ([OMIT, "UTC", "Asia/Makassar"], ["Berlin", ""]),
    "SCHEDULER_TICK_SECONDS": ([OMIT, "30", "0.5"], ["1e-9", "nan", "inf", "0"]),
    "SCHEDULER_HISTORY_MAX_RUNS": ([OMIT, "10", "1000000"], ["1" + "0" * 30, "0", "many"]),
    "SCHEDULER_HISTORY_MAX_AGE": ([OMIT, "1d", "3650d"], ["99999999999d", "nan", "0", "1s"]),
    "SCHEDULER_RUNTIME_RETENTION": ([OMIT, "7d", "1m"], ["99999999999d", "1ms", "inf"]),
    "SCHEDULER_MAX_CONCURRENCY": ([OMIT, "4"], ["0", "1e3"]),
    "SCHEDULER_STATE_URL": (["memory://", "MEMORY://", "sqlite:///{tmp}/state.db",
                             "SQLITE:///{tmp}/state.db"],
                            ["mysql://db", f"postgresql://u:{SECRET}@h:x/db", f"redis://:{SECRET}@h:x/0",
                             "sqlite:///"]),
    "SCHEDULER_SHUTDOWN_GRACE_SECONDS": ([OMIT, "5"], ["inf", "-1"]),
    "SCHEDULER_LEASE_TTL_SECONDS": ([OMIT, "15"], ["nan", "0"]),
    "SCHEDULER_ADMIN_TOKEN": ([OMIT, SECRET + "adm", ""], [f"{SECRET}\r1", SECRET + "\u00e9"]),
    "SCHEDULER_ADMIN_BIND": (["off", "127.0.0.1:0"], ["nope"]),
    "SCHEDULER_NAMESPACE": ([OMIT, "ok"], ["my app"]),
    "SCHEDULER_MAX_RUNTIME_SCHEDULES": ([OMIT, "10"], ["0"]),
    "SCHEDULER_LOG_FORMAT": (["json"], ["xml"]),
    "POSTHOG_HOST": ([OMIT, "http://127.0.0.1:1"], [f"http://u:{SECRET}@h", "h"]),
}  # fmt: skip


def refused(fields: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """Why a configuration of good values only is still refused: two combinations."""
    schedule = fields["schedule"]
    if fields["spread"] is True and not (
        isinstance(schedule, str) and schedule.startswith("every")
    ):
        return "spread needs an 'every' schedule"
    token, dev = settings["SCHEDULER_API_TOKEN"], settings["LOCAL_DEV_MODE"]
    if token in ("", OMIT) and dev != "true":
        return "no API token outside LOCAL_DEV_MODE"
    return None


def toml_value(value: Any) -> str:
    """One value as TOML (enough for the pools above)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def jobs_toml(fields: dict[str, Any]) -> str:
    lines = ["include_builtin = false", "[jobs.x]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in fields.items() if value is not OMIT]
    return "\n".join(lines) + "\n"


def environment(
    settings: dict[str, Any], *, target: str, tmp: str, jobs_file: str
) -> dict[str, str]:
    env = {"SCHEDULER_JOBS_FILE": jobs_file}
    for name, value in settings.items():
        if value is not OMIT:
            env[name] = value.replace(TARGET, target).replace("{tmp}", tmp)
    return env
