"""A real ``celery -A project flower``: its pages, ``/metrics`` included, need the
``FLOWER_BASIC_AUTH`` login; it will not listen beyond loopback without one."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import current_app

from notifications import broker
from project import devbroker
from tests.conftest import ROOT, child_env, free_port, wait_for

LOGIN = "ops:flower-test-password"


def get(url: str, login: str = "") -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def flower(port: int, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "flower", f"--port={port}", *args],
        cwd=ROOT,
        env=child_env(**env),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def flower_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    # The queues through RabbitMQ's management API, as make run and docker-compose pass it.
    api = devbroker.api_url(current_app.conf.broker_url)
    proc = flower(port, log, FLOWER_BASIC_AUTH=LOGIN, FLOWER_BROKER_API=api)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        return get(base + "/healthcheck") == 200

    wait_for(up, timeout=60, what="Flower")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_metrics_needs_the_login_like_every_other_page(flower_url: str) -> None:
    assert get(flower_url + "/metrics") == 401
    assert get(flower_url + "/metrics", "ops:wrong") == 401
    assert get(flower_url + "/metrics", LOGIN) == 200
    assert get(flower_url + "/workers") == 401
    assert get(flower_url + "/workers", LOGIN) == 200


def test_metrics_serves_prometheus_text_to_the_login(flower_url: str) -> None:
    request = urllib.request.Request(flower_url + "/metrics")
    request.add_header("Authorization", "Basic " + base64.b64encode(LOGIN.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    assert "# TYPE flower_events_total counter" in text


def test_flower_shows_the_pipelines_queues_from_the_management_api(flower_url: str) -> None:
    if not devbroker.management_answers(current_app.conf.broker_url):
        pytest.skip("RabbitMQ's management plugin is not enabled on this machine (make run enables it)")
    with current_app.connection_for_write() as conn:
        for queue in broker.queues():
            queue(conn.default_channel).declare()
    request = urllib.request.Request(flower_url + "/api/queues/length")
    request.add_header("Authorization", "Basic " + base64.b64encode(LOGIN.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        queues = {q["name"]: q for q in json.loads(response.read())["active_queues"]}
    assert {"notifications.deliver", "notifications.relay"} <= set(queues)
    assert queues["notifications.deliver"]["type"] == "quorum"


def test_healthcheck_stays_open_for_probes(flower_url: str) -> None:
    assert get(flower_url + "/healthcheck") == 200


def test_flower_refuses_to_listen_beyond_loopback_without_a_login(tmp_path: Path) -> None:
    log = tmp_path / "flower.log"
    proc = flower(free_port(), log, "--address=0.0.0.0", FLOWER_BASIC_AUTH="")
    assert proc.wait(timeout=60) == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in log.read_text()
