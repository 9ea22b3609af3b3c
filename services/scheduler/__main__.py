"""cronclock command line: run (default) | check | next | fire | demo | status | pause |
resume | trigger | schedules."""

from __future__ import annotations

# `python -m services.scheduler`: signal handlers before the slow imports below (the
# `cronclock` console script installs them in services.scheduler.cli).
if __name__ == "__main__":
    from services.scheduler import answered_version

    if answered_version():
        raise SystemExit(0)
    from services.scheduler.signals import ProcessSignals

    _EARLY: ProcessSignals | None = ProcessSignals.install()
else:
    _EARLY = None

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TextIO, cast

from schedule_grammar import Schedule, ScheduleError, dst_warnings, next_fires, parse

from . import __version__
from .config import (
    CADENCE_VARIABLES,
    SETTING_NAMES,
    Config,
    ConfigError,
    Job,
    Settings,
    format_seconds,
    load_config,
    load_jobs,
    load_settings,
    redact_url,
    require_auth,
)
from .healthcheck import local_url
from .signals import ProcessSignals
from .slots import format_slot, manual_key

# `check`, `next` and `--help` import only the configuration and the schedule language; the
# HTTP client, the state back-ends, the admin stack and PostHog load in the commands that use
# them (bench/startup.py measures it).
if TYPE_CHECKING:
    import httpx
    from pydantic import SecretStr
    from structlog.typing import FilteringBoundLogger

    from .admin import AdminServer
    from .slots import Clock
    from .stores.protocols import StateStore
    from .telemetry import ThreadDeaths

EXIT_CONFIG = 2


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    signals: ProcessSignals | None = None,
) -> int:
    signals = signals or _EARLY
    parser = _parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    command = args.command or "run"
    if signals is not None and command not in ("run", "demo"):
        signals.restore()  # a command that is not a daemon stops as commands do
        if (code := signals.exit_code()) is not None:
            return code
        signals = None
    try:
        as_json = getattr(args, "json", False)
        if command == "check":
            return cmd_check(load_config(env), sys.stdout, as_json=as_json)
        if command == "next":
            if args.schedule is not None:  # any text, no configuration needed
                if args.job is not None:
                    raise ConfigError("next: give either a JOB or --schedule, not both")
                return cmd_next_schedule(args.schedule, args.timezone, args.count, sys.stdout,
                                         as_json=as_json)  # fmt: skip
            if args.timezone is not None:
                raise ConfigError("next: --timezone needs --schedule (a job has its own zone)")
            return cmd_next(load_config(env), args.job, args.count, sys.stdout, as_json=as_json)
        if command == "fire":
            return cmd_fire(load_config(env), args.job, env, force=args.force, as_json=as_json)
        if command == "demo":
            return cmd_demo(args.duration, env, signals)
        if command == "trigger" and args.wait:
            return cmd_trigger_wait(load_settings(env), args.job, args.timeout, as_json=as_json)
        if command == "backfill":
            return cmd_backfill(load_settings(env), args, as_json=as_json)
        if command in ("status", "pause", "resume", "trigger"):
            return cmd_admin(load_settings(env), command, getattr(args, "job", None),
                             as_json=as_json)  # fmt: skip
        if command == "completion":
            if args.shell == "jobs":
                print("\n".join(job.name for job in load_config(env).jobs))
                return 0
            from .completion import script

            sys.stdout.write(script(parser, args.shell))
            return 0
        if command == "schedules":
            if args.action is None:
                parser.parse_args(["schedules", "--help"])
            return cmd_schedules(load_settings(env), args)
        return cmd_run(env, signals)
    except (ConfigError, ScheduleError) as error:  # ScheduleError: fires not computable
        print(f"cronclock: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cronclock check | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _reads(*names: str) -> str:
    """A subcommand's --help epilog: the environment variables it reads."""
    wrapped = textwrap.fill(", ".join(names), width=88, initial_indent="  ",
                            subsequent_indent="  ", break_on_hyphens=False)  # fmt: skip
    return f"environment variables read:\n{wrapped}"


# What the configuration commands read: every setting, the per-job overrides and the built-in
# table's legacy cadences (README "Settings"; .env.example lists each with its default).
CONFIG_READS = _reads(*sorted(SETTING_NAMES), "SCHEDULER_JOBS__<JOB>__<FIELD>",
                      *sorted(CADENCE_VARIABLES))  # fmt: skip
LOGGING_READS = CONFIG_READS + ",\n  NO_COLOR (console logs without colour)"
ADMIN_READS = (_reads("SCHEDULER_ADMIN_BIND", "SCHEDULER_ADMIN_TOKEN")
               + "\n  (where the daemon's admin API listens and its token; the other settings "
               "are validated too)")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cronclock",
        description="An HTTP cron clock: fires each due job as one authenticated HTTP call.",
        epilog="Configuration comes from the environment; `cronclock COMMAND --help` lists what "
        "each command reads; see README.md. NO_COLOR=1 turns colour off.",
    )
    parser.add_argument("--version", action="version", version=f"cronclock {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, text: str, reads: str | None, more: str = "", parent: Any = sub
    ) -> argparse.ArgumentParser:
        description = textwrap.fill(text[0].upper() + text[1:] + "." + (f" {more}" if more else ""),
                                    width=88)  # fmt: skip
        made: argparse.ArgumentParser = parent.add_parser(
            name, help=text, description=description,
            epilog=reads or "environment variables read: none",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        return made

    command("run", "run the daemon (the default)", LOGGING_READS,
            "SIGTERM or SIGINT drains calls in flight and stops; "
            "SIGHUP re-reads the jobs file.")  # fmt: skip
    check = command("check", "validate the configuration and print the job table", CONFIG_READS,
                    "Exit 0 means the daemon will start with it; "
                    "exit 2 names what is wrong.")  # fmt: skip
    nxt = command("next", "print the next fire times, UTC and local, DST flagged", CONFIG_READS,
                  "With --schedule no configuration is read.")  # fmt: skip
    nxt.add_argument("job", nargs="?", help="only this job")
    nxt.add_argument("-n", "--count", type=int, default=5, help="fires per job (default 5)")
    nxt.add_argument(
        "--schedule",
        metavar="EXPR",
        help="evaluate this schedule text instead of the job table (no config read)",
    )
    nxt.add_argument("--timezone", metavar="ZONE",
                     help="zone of --schedule unless the text names one (default UTC)")  # fmt: skip
    fire = command("fire", "fire one job once, now, and print the outcome", LOGGING_READS,
                   "The call goes from this process (not recorded by a running daemon: use "
                   "trigger for that). Exit 0 on success or busy, 1 otherwise.")  # fmt: skip
    fire.add_argument("job")
    fire.add_argument("--force", action="store_true",
                      help="fire even when the running daemon has the job paused")  # fmt: skip
    status = command("status", "print the job table of the running daemon (admin API)",
                     ADMIN_READS)  # fmt: skip
    for action, text in (("pause", "pause a job"), ("resume", "resume a job"),
                         ("trigger", "fire a job now")):  # fmt: skip
        command(action, f"{text} in the running daemon (admin API)", ADMIN_READS).add_argument(
            "job"
        )
    trigger = sub.choices["trigger"]
    trigger.add_argument(
        "--wait",
        action="store_true",
        help="wait for the outcome; exit 0 on success or busy (409), else 1",
    )
    trigger.add_argument("--timeout", type=float, default=300.0, metavar="S",
                         help="with --wait: stop after S seconds (default 300)")  # fmt: skip
    backfill = command(
        "backfill", "fire a job's past slots in a range again (admin API)", ADMIN_READS,
        "Each call carries its slot's own X-Scheduled-For and Idempotency-Key, so the "
        "application can tell it from a first call.",
    )  # fmt: skip
    backfill.add_argument("job")
    backfill.add_argument("--from", dest="start", required=True, metavar="TIME",
                          help="first slot, RFC 3339 (2026-11-22T00:00:00Z)")  # fmt: skip
    backfill.add_argument("--to", dest="end", required=True, metavar="TIME",
                          help="last slot, RFC 3339; not in the future")  # fmt: skip
    backfill.add_argument("--limit", type=int, default=100,
                          help="refuse more slots than this (1-1000, default 100)")  # fmt: skip
    backfill.add_argument("--overlap", choices=["skip", "allow"], default="skip",
                          help="allow: also while a run of the job is in flight")  # fmt: skip
    schedules = command(
        "schedules", "list, show or cancel runtime schedules in the running daemon", ADMIN_READS
    )
    actions = schedules.add_subparsers(dest="action", metavar="ACTION")
    listing = command("list", "runtime schedules, ordered by id", ADMIN_READS, parent=actions)
    listing.add_argument("--status", choices=["active", "executed", "cancelled", "expired"])
    listing.add_argument("--group", help="only this group")
    listing.add_argument("--after", default="", help="start after this id (the next page)")
    listing.add_argument("-n", "--limit", type=int, default=100, help="at most this many")
    command("show", "one schedule with its next run and history", ADMIN_READS,
            parent=actions).add_argument("id")  # fmt: skip
    command("cancel", "cancel a schedule: it never fires again", ADMIN_READS,
            parent=actions).add_argument("id")  # fmt: skip
    for parser_ in (check, nxt, fire, status, *(sub.choices[a] for a in ("pause", "resume")),
                    trigger, backfill, *actions.choices.values()):  # fmt: skip
        parser_.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document on stdout (README: JSON output)",
        )
    demo = command("demo", "run against a built-in demo application on loopback",
                   _reads("NO_COLOR (console logs without colour)"),
                   "Ctrl-C stops it and prints a summary.")  # fmt: skip
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    completion = command("completion", "print a shell completion script", None,
                         "bash: source <(cronclock completion bash); zsh: "
                         "cronclock completion zsh > \"${fpath[1]}/_cronclock\".")  # fmt: skip
    completion.add_argument(
        "shell", choices=["bash", "zsh", "jobs"],
        help="bash or zsh; jobs: the job names, one per line (used by the scripts)",
    )  # fmt: skip
    return parser


# -- check / next ---------------------------------------------------------------------------


def cmd_check(config: Config, out: TextIO, *, as_json: bool = False) -> int:
    require_auth(config)
    report = check_report(config, datetime.now(UTC))
    if as_json:
        return _json(report, out)
    count = f"{len(report['jobs'])} job{'' if len(report['jobs']) == 1 else 's'}"
    print(f"cronclock {__version__}: configuration OK; {report['origin']} ({count})", file=out)
    auth = "bearer token set" if report["auth"] == "bearer" else "none (LOCAL_DEV_MODE)"
    if report["signing_secrets"]:
        n = report["signing_secrets"]
        auth += f", calls signed ({n} secret{'' if n == 1 else 's'})"
    print(f"target {report['target']}  auth: {auth}  state: {report['state']}", file=out)
    if report["otlp_endpoint"]:
        print(f"spans exported over OTLP/HTTP to {report['otlp_endpoint']}", file=out)
    if report["notify"]:
        shown = ", ".join(f"{t['url']} ({t['format']})" for t in report["notify"])
        print(f"notifications to {shown}", file=out)
    rows = [("JOB", "SCHEDULE", "METHOD ENDPOINT", "TIMEOUT", "OVERLAP", "NEXT (UTC)", "SOURCE")]
    for job in report["jobs"]:
        upcoming = job["next_run"] or ("disabled" if not job["enabled"] else "-")
        rows.append((job["name"], job["schedule"], f"{job['method']} {job['endpoint']}",
                     format_seconds(job["timeout_seconds"]), job["overlap"], upcoming,
                     job["source"]))  # fmt: skip
    _table(rows, out)
    print("\nWhen calls fail (pause_after_failures, on_gone, max_silence):", file=out)
    for job in report["jobs"]:
        print(f"  {job['name']}: {_policies_text(job)}", file=out)
    if report["dst_effects"]:
        print("\nDST effects in the next 365 days:", file=out)
        for effect in report["dst_effects"]:
            print(f"  {effect['job']}: {effect['message']}", file=out)
    return 0


def _policies_text(job: dict[str, Any]) -> str:
    after = job["pause_after_failures"]
    silence = job["max_silence_seconds"]
    return "; ".join((
        f"pauses after {after} failed slot{'' if after == 1 else 's'} in a row" if after
        else "never pauses itself",
        "a 410 Gone disables it" if job["on_gone"] == "disable" else "a 410 Gone is a failure",
        f"stale after {format_seconds(silence)} without a success" if silence is not None
        else "no dead-man check (max_silence off)",
    ))  # fmt: skip


def check_report(config: Config, now: datetime) -> dict[str, Any]:
    """What `check` found, in the field names of `check --json`."""
    settings = config.settings
    jobs = []
    for job in config.jobs:
        upcoming = job.schedule.next_after(now) if job.enabled else None
        jobs.append({"name": job.name, "schedule": str(job.schedule), "method": job.method,
                     "endpoint": job.endpoint, "timeout_seconds": job.timeout,
                     "overlap": job.overlap, "enabled": job.enabled,
                     "next_run": format_slot(upcoming) if upcoming else None,
                     "pause_after_failures": job.pause_after_failures, "on_gone": job.on_gone,
                     "max_silence_seconds": job.max_silence,
                     "source": job.source})  # fmt: skip
    effects = [{"job": job.name, "transition": format_slot(warning.transition),
                "message": warning.message}
               for job in config.jobs if job.enabled
               for warning in dst_warnings(job.schedule, now)]  # fmt: skip
    return {"version": __version__, "origin": config.origin, "target": settings.api_url,
            "auth": "bearer" if config.api_token else "none",
            "signing_secrets": config.signer.count if config.signer else 0,
            "otlp_endpoint": redact_url(config.otlp_endpoint) if config.otlp_endpoint else None,
            "notify": [{"url": t.shown, "format": t.format} for t in config.notify],
            "state": redact_url(settings.state_url),
            "jobs": jobs, "dst_effects": effects}  # fmt: skip


def cmd_next(
    config: Config, only: str | None, count: int, out: TextIO, *, as_json: bool = False
) -> int:
    if count < 1:
        raise ConfigError(f"-n must be 1 or more, got {count}")
    jobs = [config.job(only)] if only else [job for job in config.jobs if job.enabled]
    now = datetime.now(UTC)
    entries = [_fires_entry(job.name, job.schedule, now, count) for job in jobs]
    if as_json:
        return _json({"schedules": entries}, out)
    for entry in entries:
        print(f"{entry['job']}  ({entry['schedule']})", file=out)
        _print_fires(entry, out)
    return 0


def cmd_next_schedule(
    text: str, zone: str | None, count: int, out: TextIO, *, as_json: bool = False
) -> int:
    """`next --schedule EXPR`: any schedule text, like `systemd-analyze calendar`."""
    if count < 1:
        raise ConfigError(f"-n must be 1 or more, got {count}")
    entry = _fires_entry(None, parse(text, timezone=zone or "UTC"), datetime.now(UTC), count)
    if as_json:
        return _json({"schedules": [entry]}, out)
    print(entry["schedule"], file=out)
    _print_fires(entry, out)
    return 0


def _fires_entry(job: str | None, schedule: Schedule, now: datetime, count: int) -> dict[str, Any]:
    """One schedule's next fires, in the field names of `next --json`."""
    fires = [{"at": format_slot(fire.at), "local": fire.local.isoformat(),
              "weekday": fire.local.strftime("%a"), "zone": fire.local.strftime("%Z"),
              "in_seconds": round((fire.at - now).total_seconds(), 3),
              "dst_note": fire.dst_note}
             for fire in next_fires(schedule, now, count)]  # fmt: skip
    ahead = [{"transition": format_slot(warning.transition), "message": warning.message}
             for warning in dst_warnings(schedule, now)]  # fmt: skip
    return {"job": job, "schedule": str(schedule), "fires": fires, "dst_ahead": ahead}


def _json(document: Any, out: TextIO = sys.stdout) -> int:
    json.dump(document, out, indent=2, ensure_ascii=False)
    out.write("\n")
    return 0


def _print_fires(entry: dict[str, Any], out: TextIO) -> None:
    if not entry["fires"]:
        print("  no more fires", file=out)
    for fire in entry["fires"]:
        local = datetime.fromisoformat(fire["local"]).strftime("%Y-%m-%d %H:%M:%S")
        flag = f"  DST: {fire['dst_note']}" if fire["dst_note"] else ""
        print(f"  {fire['at']}  {fire['weekday']} {local} {fire['zone']}  "
              f"{from_now(fire['in_seconds'])}{flag}", file=out)  # fmt: skip
    for warning in entry["dst_ahead"]:
        print(f"  DST ahead: {warning['message']}", file=out)


def from_now(seconds: float) -> str:
    """A time ahead for people, as systemctl list-timers writes it: 'in 3h 25min'."""
    return f"in {_span(seconds)}"


def _span(seconds: float) -> str:
    whole = max(0, int(seconds))
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                            ("min", 60, "s", 1)):  # fmt: skip
        if whole >= size:
            rest = (whole % size) // small_size
            return f"{whole // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{whole}s"


def status_rows(jobs: list[dict[str, Any]], now: datetime) -> list[tuple[str, ...]]:
    """`status`'s table from /api/jobs, with times relative to `now` (like list-timers)."""

    def ago(stamp: str | None, never: str = "-") -> str:
        if stamp is None:
            return never
        return f"{_span((now - _instant(stamp)).total_seconds())} ago"

    rows: list[tuple[str, ...]] = [("JOB", "SCHEDULE", "NEXT (UTC)", "LEFT", "LAST", "RESULT",
                                    "LAST SUCCESS", "IN FLIGHT")]  # fmt: skip
    for item in jobs:
        last, upcoming = item["last_run"], item["next_run"]
        if item["paused"]:
            reason = item.get("pause_reason") or ""
            upcoming_text = "disabled (410)" if "410" in reason else (
                "auto-paused" if reason else "paused")  # fmt: skip
            left = "-"
        else:
            upcoming_text = upcoming or "-"
            left = from_now((_instant(upcoming) - now).total_seconds()) if upcoming else "-"
        result = last["outcome"] or "-"
        if last["status"] is not None:
            result += f" ({last['status']})"
        rows.append((item["name"], item["schedule"], upcoming_text, left, ago(last["at"]), result,
                     ago(item["last_success"], "never"), str(item["in_flight"])))  # fmt: skip
    return rows


def _instant(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


# -- status / pause / resume / trigger: the admin API of a running daemon ----------------------


def admin_url(settings: Settings) -> str:
    """Where the running daemon's admin API answers, from SCHEDULER_ADMIN_BIND."""
    if settings.admin_bind == "off":
        raise ConfigError("SCHEDULER_ADMIN_BIND='off': the daemon serves no admin API to talk to")
    return local_url(settings.admin_bind)


def _admin_headers(settings: Settings) -> dict[str, str]:
    if settings.admin_token is None:
        return {}
    return {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}


def _ask(
    settings: Settings, command: str, calls: Callable[[httpx.Client], list[httpx.Response]]
) -> list[Any] | None:
    """The JSON bodies of admin API calls, or None after printing why they failed."""
    import httpx

    base = admin_url(settings)
    try:
        with httpx.Client(base_url=base, headers=_admin_headers(settings), timeout=10) as client:
            responses = calls(client)
    except httpx.HTTPError as error:
        print(
            f"cronclock: cannot reach the admin API at {base} ({error}); is the daemon running "
            "with this SCHEDULER_ADMIN_BIND?",
            file=sys.stderr,
        )
        return None
    for response in responses:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            print(f"cronclock: {command} failed (HTTP {response.status_code}): {message}",
                  file=sys.stderr)  # fmt: skip
            return None
    return [response.json() for response in responses]


def cmd_admin(settings: Settings, command: str, job: str | None, *, as_json: bool = False) -> int:
    def calls(client: httpx.Client) -> list[httpx.Response]:
        if command == "status":
            return [client.get("/healthz"), client.get("/api/jobs")]
        return [client.post(f"/api/jobs/{job}/{command}")]

    answers = _ask(settings, command, calls)
    if answers is None:
        return 1
    body = answers[-1]
    if as_json:  # the admin API's own documents (README: admin API)
        return _json({"health": answers[0], "jobs": body} if command == "status" else body)
    if command == "status":
        health = answers[0]
        print(_describe(health))
        _table(status_rows(body, datetime.now(UTC)), sys.stdout)
        for item in body:
            if item.get("pause_reason"):
                print(f"{item['name']}: {item['pause_reason']}; cronclock resume {item['name']}")
        for name in health.get("stale", []):
            print(f"{name}: stale, no success within its max_silence")
    elif command == "trigger":
        print(f"{body['job']}: triggered, Idempotency-Key {body['idempotency_key']}")
    else:
        print(f"{body['job']}: {'paused' if body['paused'] else 'resumed'}")
    return 0


def cmd_trigger_wait(settings: Settings, job: str, timeout: float, *, as_json: bool = False) -> int:
    """`trigger JOB --wait`: fire in the running daemon and exit by the outcome."""
    if not 0 < timeout <= 3600:
        raise ConfigError(f"--timeout must be above 0 and at most 3600 seconds, got {timeout:g}")
    answers = _ask(
        settings, "trigger",
        lambda client: [client.post(f"/api/jobs/{job}/trigger", params={"wait": timeout},
                                    timeout=timeout + 10)],
    )  # fmt: skip
    if answers is None:
        return 1
    body = answers[0]
    key = body["idempotency_key"]
    if as_json:
        _json(body)
        return outcome_exit_code(body["outcome"])
    if body["outcome"] is None:
        print(f"{job}: still running after {timeout:g} s (it goes on), Idempotency-Key {key}")
        return 1
    status = body["status"] if body["status"] is not None else "-"
    error = f": {body['error']}" if body["error"] else ""
    print(f"{job}: {body['outcome']} (HTTP {status}) after {body['attempts']} attempt(s), "
          f"Idempotency-Key {key}{error}")  # fmt: skip
    return outcome_exit_code(body["outcome"])


def cmd_backfill(settings: Settings, args: argparse.Namespace, *, as_json: bool = False) -> int:
    """`backfill JOB --from … --to …`: the running daemon fires the range's slots again."""
    body = {"from": args.start, "to": args.end, "limit": args.limit, "overlap": args.overlap}
    path = f"/api/jobs/{args.job}/backfill"
    answers = _ask(settings, "backfill", lambda client: [client.post(path, json=body)])
    if answers is None:
        return 1
    started = answers[0]
    if as_json:
        return _json(started)
    slots = started["slots"]
    span = slots[0] if len(slots) == 1 else f"{slots[0]} to {slots[-1]}"
    print(f"{args.job}: backfilling {started['count']} slot{'' if len(slots) == 1 else 's'} "
          f"({span}), one after another; `cronclock status` and the history show how they "
          "went")  # fmt: skip
    return 0


def cmd_schedules(settings: Settings, args: argparse.Namespace) -> int:
    """`schedules list|show|cancel` through the running daemon's admin API."""
    action = args.action
    if action == "list":
        params = {"limit": str(args.limit), "after": args.after}
        params |= {k: v for k, v in (("status", args.status), ("group", args.group)) if v}
        answers = _ask(settings, f"schedules {action}",
                       lambda client: [client.get("/api/schedules", params=params)])  # fmt: skip
        if answers is None:
            return 1
        page = answers[0]
        if args.json:
            return _json(page)
        rows = [("ID", "STATUS", "GROUP", "SCHEDULE", "NEXT (UTC)", "ENDPOINT")]
        for item in page["schedules"]:
            endpoint = f"{item['method']} {item['endpoint']}"
            rows.append((item["id"], item["status"], item["group"] or "-", item["schedule"],
                         item["next_run"] or "-", endpoint))  # fmt: skip
        _table(rows, sys.stdout)
        if page["next_after"]:
            print(f"(more: cronclock schedules list --after {page['next_after']})")
        return 0
    path = f"/api/schedules/{args.id}"
    answers = _ask(
        settings,
        f"schedules {action}",
        lambda client: [client.get(path) if action == "show" else client.delete(path)],
    )
    if answers is None:
        return 1
    item = answers[0]
    if args.json:
        return _json(item)
    if action == "cancel":
        print(f"{item['id']}: {item['status']}")
        return 0
    for label, key in (("id", "id"), ("status", "status"), ("group", "group"),
                       ("schedule", "schedule"), ("endpoint", "endpoint"),
                       ("next run", "next_run"), ("next local", "next_run_local"),
                       ("expires", "expires_at"), ("created", "created"),
                       ("finished", "finished"), ("revision", "revision")):  # fmt: skip
        value = item[key] if key != "endpoint" else f"{item['method']} {item['endpoint']}"
        print(f"{label + ':':<12}{value if value is not None else '-'}")
    print("runs (newest first):" if item["runs"] else "runs: none yet")
    for run in item["runs"]:
        print(f"  {run['slot']}  {run['outcome']:<16}{run['status'] or '-'}  "
              f"attempt {run['attempt']}{'  ' + run['error'] if run['error'] else ''}")  # fmt: skip
    return 0


def _describe(health: dict[str, Any]) -> str:
    """One line: this replica, its role and health, and who leads."""
    line = f"{health.get('replica')}: {health.get('role')}, {health.get('status')}"
    if health.get("role") == "standby":
        line += f"; leader {health.get('leader') or 'unknown'}"
    if health.get("fencing_token") is not None:
        line += f" (epoch {health['fencing_token']})"
    if health.get("reason"):
        line += f" -- {health['reason']}"
    target = health.get("target") or {}
    if target.get("status") == "unreachable":
        failed, error = target["consecutive_failures"], target["last_error"]
        line += (f" -- the application is unreachable since {target['since']} "
                 f"({failed} connections failed: {error})")  # fmt: skip
    return line


# -- fire -----------------------------------------------------------------------------------


def cmd_fire(
    config: Config, name: str, env: Mapping[str, str], *, force: bool = False, as_json: bool = False
) -> int:
    from .clock import SystemClock
    from .dispatch import Dispatcher
    from .stores.memory import MemoryStateStore
    from .telemetry import configure_logging, make_reporter
    from .tracing import open_export

    require_auth(config)
    job = config.job(name)
    if not force and _paused_in_daemon(config.settings, job.name):
        print(
            f"cronclock: fire: {job.name} is paused in the running daemon; resume it "
            f"(cronclock resume {job.name}) or fire it anyway with --force",
            file=sys.stderr,
        )
        return 1
    log = configure_logging(fmt=config.settings.log_format, level=config.settings.log_level,
                            color=wants_color(env))  # fmt: skip
    clock = SystemClock()
    store = MemoryStateStore(max_runs=10, max_age=timedelta(days=1))
    reporter = make_reporter(
        _secret(config.settings.posthog_api_key), config.settings.posthog_host, log
    )
    spans = open_export(config.otlp_endpoint, __version__)
    dispatcher = Dispatcher(
        api_url=config.settings.api_url,
        token=config.api_token,
        signer=config.signer,
        spans=spans,
        store=store,
        clock=clock,
        log=log,
        reporter=reporter,
        max_concurrency=1,
    )
    key = manual_key(job.name)
    result = dispatcher.call(job, clock.now(), key=key, deadline=None)
    dispatcher.shutdown(0)
    if spans is not None:
        spans.close()
    reporter.close()
    code = outcome_exit_code(result.outcome)
    if as_json:
        _json({"job": job.name, "idempotency_key": key, "outcome": result.outcome,
               "status": result.status, "attempts": result.attempts,
               "duration_seconds": round(result.duration, 3), "error": result.error})  # fmt: skip
        return code
    status = result.status if result.status is not None else "-"
    print(
        f"{job.name}: {result.outcome} (HTTP {status}) after {result.attempts} attempt(s), "
        f"{result.duration * 1000:.0f} ms" + (f": {result.error}" if result.error else "")
    )
    return code


def outcome_exit_code(outcome: str | None) -> int:
    """0 when a call succeeded or the application was busy with the job (409), else 1."""
    return 0 if outcome in ("success", "busy") else 1


def _paused_in_daemon(settings: Settings, name: str) -> bool:
    """Whether the running daemon (its admin API, if one answers) has the job paused."""
    import httpx

    if settings.admin_bind == "off":
        return False
    try:
        answer = httpx.get(f"{admin_url(settings)}/api/jobs/{name}",
                           headers=_admin_headers(settings), timeout=3)  # fmt: skip
    except httpx.HTTPError:
        print(f"cronclock: fire: no running daemon answered at {admin_url(settings)}, so "
              f"nothing says {name} is paused; firing", file=sys.stderr)  # fmt: skip
        return False
    return answer.status_code == 200 and answer.json().get("paused") is True


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


# -- run / demo -----------------------------------------------------------------------------


def cmd_run(env: Mapping[str, str], signals: ProcessSignals | None = None) -> int:
    from .clock import SystemClock
    from .telemetry import configure_logging

    config = load_config(env)
    require_auth(config)
    log = configure_logging(fmt=config.settings.log_format, level=config.settings.log_level,
                            color=wants_color(env))  # fmt: skip

    def reload() -> tuple[Job, ...]:
        return load_jobs(config.settings, os.environ)

    return serve(config, log=log, clock=SystemClock(), reload=reload, signals=signals)


def cmd_demo(
    duration: float | None, env: Mapping[str, str], signals: ProcessSignals | None = None
) -> int:
    import secrets

    from .clock import SystemClock
    from .demo import DemoTarget, WholeLines, admin_address, demo_config, summary, whole_line
    from .telemetry import configure_logging

    target = DemoTarget().start()
    bind, admin_token = admin_address(), secrets.token_urlsafe(12)
    config = demo_config(target.url, target.token, admin_bind=bind, admin_token=admin_token)
    stream = cast(TextIO, WholeLines(sys.stderr))  # a text stream, as far as logging goes
    log = configure_logging(fmt="console", level="info", stream=stream, color=wants_color(env))
    where = "" if bind == "127.0.0.1:8089" else f"SCHEDULER_ADMIN_BIND={bind} "
    whole_line(
        f"cronclock demo: a demo application listens on {target.url}; jobs: "
        + ", ".join(f"{job.name} ({job.schedule})" for job in config.jobs)
        + f".\nStatus page: http://{bind}/ (admin token {admin_token}). In another shell: "
        f"{where}SCHEDULER_ADMIN_TOKEN={admin_token} python -m services.scheduler status "
        "(or trigger demo-tick). Ctrl-C stops and sums up."
    )
    began = time.monotonic()

    def sum_up(store: StateStore) -> None:
        whole_line(summary(store, config.jobs, time.monotonic() - began))

    try:
        return serve(config, log=log, clock=SystemClock(), stop_after=duration, signals=signals,
                     after=sum_up)  # fmt: skip
    finally:
        target.stop()


def wants_color(env: Mapping[str, str]) -> bool:
    """Colour unless NO_COLOR is set to anything but the empty string (no-color.org)."""
    return not env.get("NO_COLOR")


def serve(
    config: Config,
    *,
    log: FilteringBoundLogger,
    clock: Clock,
    reload: Callable[[], tuple[Job, ...]] | None = None,
    stop_after: float | None = None,
    signals: ProcessSignals | None = None,
    after: Callable[[StateStore], None] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop_after` seconds); 0 on a clean stop,
    1 when the loop or another internal thread died. `signals`: handlers installed at the
    start of the process (else serve installs its own and restores them when done). `after`
    reads the state store once the calls have drained, before it is closed."""
    from .telemetry import ThreadDeaths

    own_signals = signals is None
    signals = signals or ProcessSignals.install()
    deaths = ThreadDeaths(log, on_death=clock.wake).install()
    try:
        return _serve(config, log, clock, reload, stop_after, signals, deaths, after)
    finally:
        signals.detach()
        deaths.uninstall()
        if own_signals:
            signals.restore()


def _serve(
    config: Config,
    log: FilteringBoundLogger,
    clock: Clock,
    reload: Callable[[], tuple[Job, ...]] | None,
    stop_after: float | None,
    signals: ProcessSignals,
    deaths: ThreadDeaths,
    after: Callable[[StateStore], None] | None = None,
) -> int:
    import threading

    from .clock import DEFAULT_LEAD_SECONDS, Scheduler
    from .dispatch import Dispatcher
    from .policies import FailurePolicy
    from .schedules import RuntimeSchedules
    from .stores import open_store
    from .stores.protocols import StoreRefused
    from .telemetry import Metrics, make_reporter
    from .tracing import open_export
    from .wire import LoopThread, Wire

    settings = config.settings
    try:
        opened = open_store(settings, log)
    except StoreRefused as error:
        raise ConfigError(
            f"SCHEDULER_STATE_URL={redact_url(settings.state_url)!r}: {error}"
        ) from None
    store, coordinator, close_state = opened.store, opened.coordinator, opened.close
    # One event loop: the wire writes the calls on it, the admin API is served on it.
    loop = LoopThread()
    runtime = RuntimeSchedules(
        opened.schedules,
        timezone=settings.timezone,
        limit=settings.max_runtime_schedules,
        retention=settings.runtime_retention,
        log=log,
    )
    reporter = make_reporter(_secret(settings.posthog_api_key), settings.posthog_host, log)
    if config.api_token is None:
        log.warning("LOCAL_DEV_MODE: calls carry no Authorization header")
    metrics = Metrics()
    notifier = None
    if config.notify:
        from .notify import Notifier

        notifier = Notifier(config.notify, log=log, replica=coordinator.status().identity,
                            signer=config.signer)  # fmt: skip
    policy = FailurePolicy(store, log=log, metrics=metrics, notifier=notifier, now=clock.now)
    spans = open_export(config.otlp_endpoint, __version__)
    dispatcher = Dispatcher(
        api_url=settings.api_url,
        token=config.api_token,
        signer=config.signer,
        spans=spans,
        store=store,
        clock=clock,
        log=log,
        reporter=reporter,
        max_concurrency=settings.max_concurrency,
        metrics=metrics,
        fencing_token=coordinator.fencing_token,
        may_fire=coordinator.leading,
        on_finished=lambda job, result, deadline: scheduler.call_finished(job, result, deadline),
        on_settled=policy.settled,
        wire=Wire(connections=settings.max_concurrency, loop=loop) if settings.fast_path else None,
    )
    log.info("calls go out", fast_path=dispatcher.fast_path,
             max_concurrency=settings.max_concurrency)  # fmt: skip
    scheduler = Scheduler(
        jobs=[job for job in config.jobs],
        firer=dispatcher,
        store=store,
        clock=clock,
        log=log,
        tick_seconds=settings.tick_seconds,
        reload=reload,
        lead_seconds=DEFAULT_LEAD_SECONDS,
        metrics=metrics,
        coordinator=coordinator,
        runtime=runtime,
        notifier=notifier,
    )

    def on_stop(name: str) -> None:
        log.info("stop requested", signal=name)
        scheduler.stop()

    def on_hup() -> None:
        log.info("reload requested", signal="SIGHUP")
        scheduler.request_reload()

    # A signal that came during start-up is delivered now; a stop then ends the daemon
    # cleanly (exit 0) right after it has started.
    signals.attach(on_stop=on_stop, on_reload=on_hup if reload is not None else None)
    opened.schedules.watch(scheduler.schedules_changed)
    admin: AdminServer | None = None
    if settings.admin_bind != "off":
        from .admin import AdminContext, AdminServer, create_app  # FastAPI: only when served

        context = AdminContext(
            scheduler=scheduler,
            dispatcher=dispatcher,
            store=store,
            metrics=metrics,
            clock=clock,
            admin_token=settings.admin_token,
            local_dev_mode=settings.local_dev_mode,
            tick_seconds=settings.tick_seconds,
            coordinator=coordinator,
            schedules=runtime,
            thread_deaths=deaths,
            started=clock.now(),
        )
        admin = AdminServer(create_app(context), settings.admin_bind, log, loop)
        try:
            url = admin.start()
        except OSError as error:
            dispatcher.shutdown(0)
            loop.stop()
            close_state()
            if spans is not None:
                spans.close()
            reporter.close()
            raise ConfigError(
                f"SCHEDULER_ADMIN_BIND={settings.admin_bind!r}: {error}; choose another "
                "address or set it to 'off'"
            ) from None
        if settings.admin_token is None and not settings.local_dev_mode:
            log.warning(
                "admin API without SCHEDULER_ADMIN_TOKEN: only /healthz and /metrics answer"
            )
        log.info("admin API listening", url=url, loop=loop.name)
    beats = threading.Thread(target=scheduler.run, name="clock", daemon=True)
    enabled = [job.name for job in config.jobs if job.enabled]
    log.info(
        "cronclock started",
        version=__version__,
        target=settings.api_url,
        jobs=len(enabled),
        max_concurrency=settings.max_concurrency,
        state=redact_url(settings.state_url),
        replica=coordinator.status().identity,
    )
    beats.start()
    started = clock.monotonic()
    # The main thread only waits: signal handlers run here, never inside the loop's locks.
    while beats.is_alive():
        beats.join(0.2)
        if stop_after is not None and clock.monotonic() - started >= stop_after:
            scheduler.stop()
        if deaths.reason is not None and not scheduler.stopping:
            scheduler.stop()
    crashed = deaths.reason is not None or not scheduler.stopping  # not asked to end
    if crashed:
        log.error("the daemon stops unexpectedly", reason=deaths.reason or "the clock loop ended")
    left = dispatcher.shutdown(settings.shutdown_grace_seconds)
    coordinator.stop()
    if admin is not None:
        admin.stop()
    loop.stop()
    if after is not None:
        after(store)
    close_state()
    if spans is not None:
        spans.close()  # the spans still batched are sent
    if notifier is not None:
        notifier.close()  # what is waiting is sent, for at most 5 s
    reporter.close()
    log.info("cronclock stopped", abandoned=left)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
