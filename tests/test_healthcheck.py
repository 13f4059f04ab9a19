"""The worker's health check with real worker processes and the shipped interval and
window: fresh while the worker consumes, stale once it is killed or loses its broker."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, Workers, child_env, rabbitmqctl, wait_for

INTERVAL = 2.0  # NOTIFICATIONS_WORKER_ALIVE_INTERVAL's default
WINDOW = 5 * INTERVAL  # the check's default --max-age


def check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifications.healthcheck", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def healthy(alive: Path) -> bool:
    return check("--file", str(alive)).returncode == 0


def test_the_check_passes_while_the_worker_runs_and_fails_a_window_after_it_is_killed(
    workers: Workers, tmp_path: Path
) -> None:
    alive = tmp_path / "worker.alive"
    assert check("--file", str(alive)).returncode == 1  # no worker yet

    worker = workers.start(NOTIFICATIONS_WORKER_ALIVE_FILE=str(alive))
    wait_for(lambda: healthy(alive), timeout=10, what="a fresh alive file")
    # The form a container runs: the file named by the setting, the default window.
    assert check(NOTIFICATIONS_WORKER_ALIVE_FILE=str(alive)).returncode == 0
    touched = alive.stat().st_mtime
    wait_for(lambda: alive.stat().st_mtime > touched, timeout=3 * INTERVAL, what="the next touch")

    worker.kill()
    killed = time.monotonic()
    assert healthy(alive)  # a window, so a moment's stall is not a restart
    wait_for(lambda: not healthy(alive), timeout=WINDOW + 5, interval=0.5, what="the check to fail")
    stale_after = time.monotonic() - killed
    assert WINDOW - INTERVAL - 1 <= stale_after <= WINDOW + 5

    result = check("--file", str(alive))
    assert result.returncode == 1
    assert "last touched" in result.stderr


def test_the_check_fails_while_the_worker_has_no_broker_and_passes_once_it_is_back(
    workers: Workers, tmp_path: Path
) -> None:
    vhost = f"notifications-test-alive-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    alive = tmp_path / "worker.alive"
    try:
        worker = workers.start(
            NOTIFICATIONS_WORKER_ALIVE_FILE=str(alive), CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        )
        wait_for(lambda: healthy(alive), timeout=10, what="a fresh alive file")

        rabbitmqctl("delete_vhost", vhost)  # its connections close, and it refuses new ones
        wait_for(lambda: not healthy(alive), timeout=WINDOW + 10, interval=0.5, what="the check to fail")
        assert worker.proc.poll() is None, "the process lives on, trying to reconnect: only the check says so"

        rabbitmqctl("add_vhost", vhost)  # the broker is back: the worker reconnects, and the check passes
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        wait_for(lambda: healthy(alive), timeout=60, interval=0.5, what=lambda: worker.output()[-3000:])
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


def test_the_check_says_what_is_missing(tmp_path: Path) -> None:
    result = check("--file", str(tmp_path / "nothing-here"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr

    result = check(NOTIFICATIONS_WORKER_ALIVE_FILE="")
    assert result.returncode == 1
    assert "NOTIFICATIONS_WORKER_ALIVE_FILE" in result.stderr


@pytest.mark.django_db  # the test database, which beat's relay loop reads
def test_beats_check_follows_its_relay_loop(tmp_path: Path) -> None:
    vhost = f"notifications-test-beat-{uuid.uuid4().hex[:8]}"  # beat's periodic tasks land here, not in the run's
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    env = {"CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"}
    log = tmp_path / "beat.log"
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "beat", "-s", str(tmp_path / "schedule")],
        cwd=ROOT,
        env=child_env(**env),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: check("--relay-loop", **env).returncode == 0, timeout=30, what=lambda: log.read_text())

        beat.kill()  # no shutdown: the heartbeat lapses on its own
        beat.wait(timeout=10)
        result = wait_for(
            lambda: (r := check("--relay-loop", **env)).returncode == 1 and r, timeout=15, what="the check to fail"
        )
        assert "no relay loop heartbeat" in result.stderr
    finally:
        if beat.poll() is None:
            beat.kill()
            beat.wait(timeout=10)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)
