"""Issue 19: the demo as a newcomer meets it. It serves the admin API and status page with a
demo token, its application's lines and the daemon's never share a line, Ctrl-C sums up, and
NO_COLOR turns the colours of a terminal off."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import httpx

from tests.integration.conftest import ROOT, base_env, run_cli

INTRO = re.compile(r"Status page: http://(?P<bind>[\d.]+:\d+)/ \(admin token (?P<token>\S+)\)")
LINE = re.compile(r"(cronclock demo: |Status page: |demo app <- |\d{4}-\d\d-\d\dT[\d:.]+Z \[)")


def test_the_demo_serves_its_admin_api_keeps_lines_whole_and_sums_up_on_ctrl_c() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "services.scheduler", "demo"], cwd=ROOT,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        assert demo.stdout is not None
        lines = [demo.stdout.readline(), demo.stdout.readline()]
        intro = INTRO.search(lines[1])
        assert intro, lines
        bind, token = intro["bind"], intro["token"]
        time.sleep(7)  # every demo job has had a slot, demo-flaky a retry
        cli_env = base_env(SCHEDULER_ADMIN_BIND=bind, SCHEDULER_ADMIN_TOKEN=token)
        status = run_cli("status", env=cli_env)
        assert status.returncode == 0, status.stderr
        assert {"demo-tick", "demo-slow", "demo-flaky"} <= {
            line.split()[0] for line in status.stdout.splitlines()[2:]
        }
        for _ in range(20):  # demo-tick fires every second: a trigger meeting its run is 409
            triggered = run_cli("trigger", "demo-tick", "--wait", env=cli_env)
            if "is in flight" not in triggered.stderr:
                break
            time.sleep(0.1)
        assert triggered.returncode == 0, triggered.stderr
        page = httpx.get(f"http://{bind}/", timeout=10)
        assert page.status_code == 200 and "cronclock" in page.text
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = demo.communicate(timeout=30)
    finally:
        demo.kill()
    assert demo.returncode == 0
    lines += rest.splitlines(keepends=True)
    for line in lines:  # one writer's line at a time: no line starts inside another
        assert LINE.match(line), repr(line)
        assert line.count("demo app <-") + line.count("Z [") <= 1, repr(line)
    (summary,) = [line for line in lines if " calls for " in line]
    calls, slots, retries = map(int, re.search(
        r"(\d+) calls for (\d+) slots .*; (\d+) retr", summary).groups())  # fmt: skip
    received = sum(1 for line in lines if line.startswith("demo app <-"))
    assert calls == received and calls == slots + retries and retries >= 1, summary
    assert "skipped as overlapping: " in summary and "of demo-slow" in summary


def _demo_on_a_terminal(env: dict[str, str], seconds: float = 4) -> bytes:
    leader, follower = pty.openpty()
    demo = subprocess.Popen([sys.executable, "-m", "services.scheduler", "demo", "--duration",
                             str(seconds)], cwd=ROOT, env=env, stdout=follower, stderr=follower)  # fmt: skip
    os.close(follower)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the demo ended
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        demo.wait(timeout=30)
    assert demo.returncode == 0, out.decode(errors="replace")[-2000:]
    return out


def test_no_color_turns_the_colours_of_a_terminal_off() -> None:
    env = {k: v for k, v in base_env().items() if k != "NO_COLOR"}  # the caller's own, if any
    coloured = _demo_on_a_terminal(env)
    plain = _demo_on_a_terminal({**env, "NO_COLOR": "1"})
    assert b"\x1b[" in coloured and b"admin API listening" in coloured
    assert b"\x1b[" not in plain and b"admin API listening" in plain
