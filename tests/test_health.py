"""/healthz and /readyz against the real services: all up, one unreachable (a closed port
or a missing vhost, never a stopped shared service), one that accepts connections and
never answers, and who gets the details."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import override_settings

from tests.conftest import ROOT, child_env, free_port, wait_for
from tests.settings import VHOST

SHIPPED_TIMEOUT = 2.0  # NOTIFICATIONS_HEALTH_TIMEOUT in project/settings.py
CHECKS = {"postgresql", "redis", "rabbitmq"}
OUTSIDE = "10.20.30.40"  # any address that is not loopback


closed_port = free_port  # a port nothing listens on: a stopped service, without stopping the shared one


class Silent:
    """A server that accepts connections and never says a word, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def readyz(client: Client, **extra: Any) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz", **extra)
    return response.status_code, json.loads(response.content)


def test_healthz_answers_without_the_database(client: Client) -> None:
    # No django_db mark: any database access here would raise.
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.content == b"ok\n"
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
def test_readyz_is_200_when_every_service_answers(client: Client) -> None:
    status, body = readyz(client)

    assert status == 200
    assert body["status"] == "ok"
    assert {name: check["state"] for name, check in body["checks"].items()} == dict.fromkeys(CHECKS, "ok")


@pytest.mark.django_db
def test_readyz_names_redis_when_its_port_is_closed(client: Client) -> None:
    with override_settings(NOTIFICATIONS_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0"):
        status, body = readyz(client)

    assert status == 503
    assert body["status"] == "unavailable"
    checks = body["checks"]
    assert checks["redis"]["state"] == "failed"
    assert "ConnectionError" in checks["redis"]["error"]
    assert checks["postgresql"]["state"] == checks["rabbitmq"]["state"] == "ok"


@pytest.mark.django_db
def test_readyz_names_rabbitmq_when_its_vhost_is_missing(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    url = current_app.conf.broker_write_url
    assert url.endswith(VHOST)
    monkeypatch.setenv("CELERY_BROKER_URL", url[: -len(VHOST)] + "no-such-vhost-for-readyz")  # Celery reads it first
    status, body = readyz(client)

    assert status == 503
    checks = body["checks"]
    assert checks["rabbitmq"]["state"] == "failed"
    assert "vhost no-such-vhost-for-readyz not found" in checks["rabbitmq"]["error"]
    assert checks["postgresql"]["state"] == checks["redis"]["state"] == "ok"


# Who sees the details ---------------------------------------------------------------


@pytest.mark.django_db
def test_a_caller_beyond_loopback_gets_the_status_code_only(client: Client) -> None:
    with override_settings(NOTIFICATIONS_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0"):
        assert readyz(client, REMOTE_ADDR=OUTSIDE) == (503, {"status": "unavailable"})
    assert readyz(client, REMOTE_ADDR=OUTSIDE) == (200, {"status": "ok"})


@pytest.mark.django_db
@override_settings(NOTIFICATIONS_OPS_TOKEN="s3cret-ops-token")
def test_the_ops_token_opens_the_details(client: Client) -> None:
    status, body = readyz(client, REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION="Bearer s3cret-ops-token")
    assert status == 200 and set(body["checks"]) == CHECKS

    for wrong in ("Bearer s3cret-ops-tokeN", "Basic s3cret-ops-token", "s3cret-ops-token", "Bearer "):
        assert readyz(client, REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=wrong) == (200, {"status": "ok"}), wrong


@pytest.mark.django_db
def test_a_staff_user_sees_the_details_and_other_users_do_not(client: Client) -> None:
    user = get_user_model().objects.create_user("ops-reader", password="x")
    client.force_login(user)
    assert readyz(client, REMOTE_ADDR=OUTSIDE) == (200, {"status": "ok"})

    user.is_staff = True
    user.save()
    status, body = readyz(client, REMOTE_ADDR=OUTSIDE)
    assert status == 200 and set(body["checks"]) == CHECKS


@pytest.mark.django_db
@override_settings(NOTIFICATIONS_OPS_LOOPBACK=False)
def test_loopback_trust_can_be_turned_off_behind_a_local_proxy(client: Client) -> None:
    assert readyz(client, REMOTE_ADDR="127.0.0.1") == (200, {"status": "ok"})
    assert readyz(client, REMOTE_ADDR="::1") == (200, {"status": "ok"})


# A real web process ------------------------------------------------------------------

SERVE = (
    "import sys\n"
    "from wsgiref.simple_server import make_server\n"
    "from project.wsgi import application\n"
    "make_server('127.0.0.1', int(sys.argv[1]), application).serve_forever()\n"
)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Any]:
    """Start the project's WSGI application in a process of its own with ``env``; the
    shipped settings otherwise (no runserver: it will not start without its database)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> str:
        port = closed_port()
        log = open(tmp_path / f"web-{len(started)}.log", "wb")  # noqa: SIM115 (closed with the process)
        environment = child_env(**env)
        environment.pop("NOTIFICATIONS_HEALTH_TIMEOUT", None)
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(port)], cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
        started.append(proc)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / f"web-{len(started) - 1}.log").read_text()
            return get(base + "/healthz")[0] == 200

        wait_for(up, timeout=60, what="the web process")
        return base

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_the_web_process_names_postgresql_when_its_port_is_closed(web: Any) -> None:
    base = web(DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed_port()}/notifications")

    assert get(base + "/healthz") == (200, b"ok\n")  # alive, so no restart: only out of rotation
    status, raw = get(base + "/readyz")
    body = json.loads(raw)
    assert status == 503
    assert body["checks"]["postgresql"]["state"] == "failed"
    assert "Connection refused" in body["checks"]["postgresql"]["error"]
    assert body["checks"]["redis"]["state"] == body["checks"]["rabbitmq"]["state"] == "ok"


def test_readyz_returns_within_its_timeout_when_every_service_hangs(web: Any) -> None:
    hang = {name: Silent() for name in CHECKS}  # each accepts connections and never answers
    try:
        base = web(
            DATABASE_URL=f"postgres://postgres@127.0.0.1:{hang['postgresql'].port}/notifications",
            REDIS_URL=f"redis://127.0.0.1:{hang['redis'].port}/0",
            CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{hang['rabbitmq'].port}//",
        )
        began = time.monotonic()
        status, raw = get(base + "/readyz")
        took = time.monotonic() - began
        body = json.loads(raw)

        assert status == 503
        assert {name: check["state"] for name, check in body["checks"].items()} == dict.fromkeys(CHECKS, "timeout")
        # The three are asked at once: the whole answer takes one timeout, not three.
        assert SHIPPED_TIMEOUT - 0.1 <= took < SHIPPED_TIMEOUT + 1.5

        # PostgreSQL's probe is still waiting (its driver's connect_timeout is 5 s): the
        # next request joins it instead of opening another connection behind it.
        assert get(base + "/readyz")[0] == 503
        assert len(hang["postgresql"].accepted) == 1
    finally:
        for server in hang.values():
            server.close()


# With NOTIFICATIONS_BROKER=kafka ----------------------------------------------------------


@pytest.fixture(scope="module")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-protocol broker (noida-db, not Apache Kafka) on a free port with a data
    dir of its own; its process group is killed at the end."""
    import os
    import signal

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    port = closed_port()
    data = tmp_path_factory.mktemp("kafka")
    log = open(data / "broker.log", "wb")  # noqa: SIM115 (closed with the process)
    argv = ["start", "--only", "kafka", "--kafka-port", str(port), "--host", "127.0.0.1", "--data-dir", str(data)]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "noida-db"), *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    bootstrap = f"127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, (data / "broker.log").read_text()
        try:
            AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=1.0)
        except KafkaException:
            return False
        return True

    try:
        wait_for(answers, timeout=30, what="the Kafka broker")
        yield bootstrap
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def _settled(name: str) -> bool:
    """No probe ``name`` still running (a later request would join it)."""
    from notifications import health

    running = health._running.get(name)
    return running is None or running.done()


@pytest.mark.django_db
def test_readyz_asks_kafka_beside_celerys_broker(client: Client, kafka_server: str) -> None:
    with override_settings(NOTIFICATIONS_BROKER="kafka", NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS=kafka_server):
        status, body = readyz(client)

    assert status == 200, body
    # Celery's broker is still asked: the relay wake-ups and beat's tasks ride it.
    assert {name: check["state"] for name, check in body["checks"].items()} == dict.fromkeys(CHECKS | {"kafka"}, "ok")


@pytest.mark.django_db
def test_readyz_names_kafka_when_no_broker_answers(client: Client) -> None:
    with override_settings(
        NOTIFICATIONS_BROKER="kafka", NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}"
    ):
        began = time.monotonic()
        status, body = readyz(client)
        took = time.monotonic() - began

    assert status == 503 and body["status"] == "unavailable"
    checks = body["checks"]
    # librdkafka retries a refused connection until the deadline: no answer is a timeout.
    assert checks["kafka"]["state"] in ("failed", "timeout"), checks
    assert took < float(SHIPPED_TIMEOUT) + 1.5
    assert {checks[name]["state"] for name in CHECKS} == {"ok"}
    wait_for(lambda: _settled("kafka"), timeout=10, what="the Kafka probe's end")


@pytest.mark.django_db
def test_readyz_does_not_ask_kafka_with_rabbitmq(client: Client) -> None:
    with override_settings(NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}"):
        status, body = readyz(client)

    assert status == 200 and set(body["checks"]) == CHECKS
