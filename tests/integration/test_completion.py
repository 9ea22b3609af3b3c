"""Issue 19: `cronclock completion bash|zsh`, run in the real shells with the real console
script: commands, options, nested actions and the job names of the shell's environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import base_env

SCRIPT = Path(sys.executable).with_name("cronclock")
JOBS = '[jobs.nightly-report]\nschedule = "daily 03:00"\nendpoint = "/r"\n' \
       '[jobs.ping]\nschedule = "every 1m"\nendpoint = "/p"\n'  # fmt: skip
# (the words typed so far, what completes)
CASES = [
    ("cronclock pa", "pause"),
    ("cronclock s", "status schedules"),
    ("cronclock trigger ", "nightly-report ping"),
    ("cronclock resume n", "nightly-report"),
    ("cronclock trigger --w", "--wait"),
    ("cronclock schedules ", "list show cancel -h --help"),
    ("cronclock schedules list --s", "--status"),
    ("cronclock completion ", "bash zsh"),
    ("cronclock next --sch", "--schedule"),
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if not SCRIPT.exists():
        pytest.skip("the cronclock console script is not installed (pip install -e .)")
    (tmp_path / "jobs.toml").write_text(JOBS)
    return base_env(PATH=f"{SCRIPT.parent}:/usr/bin:/bin", SCHEDULER_API_TOKEN="t",
                    SCHEDULER_JOBS_FILE=str(tmp_path / "jobs.toml"))  # fmt: skip


def _shell(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it with apt-get)")
    return found


def test_bash_completes_commands_options_and_job_names(env: dict[str, str]) -> None:
    program = ["source <(cronclock completion bash)"]
    for typed, _ in CASES:
        program.append(f'read -ra COMP_WORDS <<< "{typed}"')
        if typed.endswith(" "):
            program.append('COMP_WORDS+=("")')
        program += ["COMP_CWORD=$((${#COMP_WORDS[@]} - 1))", "_cronclock",
                    'echo "${COMPREPLY[*]}"']  # fmt: skip
    result = subprocess.run([_shell("bash"), "--norc", "-c", "\n".join(program)], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines() == [wanted for _, wanted in CASES]


def test_zsh_completes_commands_options_and_job_names(env: dict[str, str], tmp_path: Path) -> None:
    """The completion functions, with compadd and _describe standing in for zsh's completion
    system (which needs a terminal): what they would offer, in order."""
    zsh = _shell("zsh")
    path = tmp_path / "_cronclock"
    path.write_text(subprocess.run([str(SCRIPT), "completion", "zsh"], env=env, check=True,
                                   capture_output=True, text=True).stdout)  # fmt: skip
    assert subprocess.run([zsh, "-n", str(path)], capture_output=True).returncode == 0
    program = [
        "offered=()",
        'compadd() { [[ $1 == -- ]] && shift; offered+=("$@") }',
        '_describe() { local item; for item in ${(P)2}; do offered+=("${item%%:*}"); done }',
        "compdef() { print -r -- registered $* }",
        f"source {path}",
    ]
    for typed, _ in CASES:
        words = typed.split() + ([""] if typed.endswith(" ") else [])
        quoted = " ".join(f"'{w}'" for w in words)
        program += [f"words=({quoted})", f"CURRENT={len(words)}", f"PREFIX='{words[-1]}'",
                    "offered=()", "_cronclock",
                    # zsh filters by the prefix itself; do as it does
                    'print -r -- ${(j: :)${(M)offered:#${PREFIX}*}}']  # fmt: skip
    result = subprocess.run([zsh, "-f", "-c", "\n".join(program)], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    registered, *offered = result.stdout.splitlines()
    assert registered == "registered _cronclock cronclock"
    assert offered == [wanted for _, wanted in CASES]
