"""The app ships what services run: a caller that installs ``notifications`` gets its
commands (the chaos run, the relay), not this repository's tools (the benchmark and the
local dev stack), which live with the example project."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.conftest import ROOT, child_env

TOOLS = {"bench", "bench_backlog", "devstack"}
APP_COMMANDS = {"chaos", "relay"}


def commands(settings_module: str) -> dict[str, set[str]]:
    """``manage.py help`` under ``settings_module``: each app's section and its commands."""
    out = subprocess.run(
        [sys.executable, "manage.py", "help"],
        cwd=ROOT,
        env=child_env(DJANGO_SETTINGS_MODULE=settings_module),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    sections: dict[str, set[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = set()
        elif current and line.startswith("    "):
            sections[current].add(line.strip())
    return sections


def test_a_calling_service_gets_the_apps_commands_and_not_the_repositorys_tools() -> None:
    sections = commands("tests.other_service_settings")
    listed = set().union(*sections.values())

    assert sections["notifications"] >= APP_COMMANDS
    assert not TOOLS & listed
    assert "project" not in sections


def test_this_repository_still_has_its_tools() -> None:
    sections = commands("tests.settings")

    assert sections["project"] >= TOOLS
    assert sections["notifications"] >= APP_COMMANDS


def test_the_app_package_holds_no_benchmark_or_dev_stack() -> None:
    assert importlib.util.find_spec("notifications.bench") is None
    assert not (ROOT / "notifications" / "management" / "commands" / "devstack.py").exists()
    assert importlib.util.find_spec("project.bench.run") is not None
    # The chaos run proves the contract on an operator's own infrastructure: it stays.
    assert importlib.util.find_spec("notifications.chaos.run") is not None
