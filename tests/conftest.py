"""Fixtures: this run's RabbitMQ vhost and Redis db, a real SMTP server, and real
Celery worker processes pointed at the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from django.conf import settings
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tests import smtp
from tests.settings import RUN_ID, VHOST

ROOT = Path(__file__).resolve().parent.parent

# Property tests (test_properties.py): each example is a real trip through PostgreSQL,
# RabbitMQ and an SMTP server, so a few dozen per property; ``--hypothesis-profile
# explore`` runs many more. The trip fixture is set up once per test, not per example.
_HYPOTHESIS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
}
hypothesis_settings.register_profile("notifications", max_examples=80, **_HYPOTHESIS)
hypothesis_settings.register_profile("explore", max_examples=2000, **_HYPOTHESIS)
hypothesis_settings.load_profile("notifications")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str | Callable[[], Any] = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = what() if callable(what) else what  # a callable says what was there instead
            raise AssertionError(f"timed out after {timeout}s waiting for {seen or predicate}")
        time.sleep(interval)


def delivery_outcomes(key: str) -> list[str]:
    """The outcomes the finished deliver tasks stored for ``key``, sorted: what Flower and
    the result backend show. A batch's result lists an outcome per notification; a
    "retry" (the notification went back to the outbox, due later) finished nothing and is
    left out."""
    import json

    from django_celery_results.models import TaskResult

    found = []
    for row in TaskResult.objects.filter(status="SUCCESS"):  # deliveries are the only tasks that store results
        result = json.loads(row.result or "null")
        if not isinstance(result, dict):
            continue
        for outcome in result.get("outcomes", [result]):
            if outcome.get("key") == key and outcome.get("status") != "retry":
                found.append(outcome["status"])
    return sorted(found)


def take_delivery_payloads(
    wait: float = 0.5, limit: int = 0, queue_name: str = "notifications.deliver"
) -> list[list[dict[str, Any]]]:
    """Consume the delivery messages waiting in the queue (no worker runs; all of them, or
    the first ``limit``), decoded by kombu as a worker decodes them: the notification
    payloads each one carried (declaring the queues first, as the relay does)."""
    import queue as queue_module

    from celery import current_app

    from notifications import broker

    messages: list[list[dict[str, Any]]] = []
    with current_app.connection_for_read() as conn:
        for declared in (*broker.queues(), broker.dead_letter_queue()):  # so that there is a queue to read
            declared(conn.default_channel).declare()
        queue = conn.SimpleQueue(queue_name, no_ack=False, queue_opts={"no_declare": True})
        queue.queue.no_declare = True
        try:
            while not limit or len(messages) < limit:
                try:
                    message = queue.get(block=True, timeout=wait)
                except queue_module.Empty:
                    return messages
                args = message.payload[0]  # kombu's decoding, by the message's content type
                messages.append(args[0] if isinstance(args[0], list) else args)  # deliver_many carries a list
                message.ack()
            return messages
        finally:
            queue.close()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session", autouse=True)
def no_stray_sessions_at_teardown(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """A worker process a test killed can leave its PostgreSQL session behind for a moment,
    and the sending threads keep connections of their own: end them at the close of the
    run, so that the test database is dropped rather than left on the server."""
    yield
    with django_db_blocker.unblock():
        from django.db import connection

        if connection.settings_dict["NAME"] != connection.settings_dict["TEST"]["NAME"]:
            return  # no test of this run used the database, so pytest-django created none
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


@pytest.fixture(scope="session", autouse=True)
def broker_vhost() -> Iterator[str]:
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    yield VHOST
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", VHOST], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(settings.NOTIFICATIONS_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(autouse=True)
def fresh_relay_wakeups(redis_client: redis_lib.Redis) -> None:
    """Tests run no beat, so a relay wake-up flag left set by an earlier test (whose worker
    could not reach Redis to clear it) would leave the next test's rows unpublished."""
    from notifications.conf import settings as conf
    from notifications.relay import WAKE_FLAG, _waker, key

    _waker.flush()  # a wake-up of the test before is sent (from its thread) before the flag goes
    redis_client.delete(f"{conf.REDIS_KEY_PREFIX}{key(WAKE_FLAG)}")


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[smtp.SMTPServer]:
    server = smtp.start(int(settings.EMAIL_PORT))
    yield server
    server.controller.stop()


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the moment of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str = "n") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def notification_kwargs(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "service": "tests",
        "notification_id": unique(),
        "user_id": "42",
        "to": "ann@example.com",
        "subject": "Your invoice",
        "body": "Hello Ann",
    }
    values.update(overrides)
    return values


def test_database_url() -> str:
    name = settings.DATABASES["default"]["NAME"]
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=test_database_url(),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PGAPPNAME="notifications-test-child",  # so a test can cut the children's sessions, not its own
    )
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """A real ``celery -A project worker`` (prefork) started by a test."""

    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the main process and its pool children: a crash, no shutdown."""
        pids = [self.proc.pid, *self.children()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Workers:
    tmp: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(self, concurrency: int = 2, queues: str = "", **env: str) -> WorkerProcess:
        name = f"w{len(self.started)}-{RUN_ID}-{uuid.uuid4().hex[:4]}@%h"
        log = self.tmp / f"worker-{len(self.started)}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "project",
            "worker",
            "-l",
            "info",
            "-c",
            str(concurrency),
            "-n",
            name,
            "--without-mingle",
            "--without-gossip",
        ]
        if queues:
            cmd += ["-Q", queues]
        handle = open(log, "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**env), stdout=handle, stderr=subprocess.STDOUT)
        worker = WorkerProcess(proc=proc, log=log, name=name)
        self.started.append(worker)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{worker.output()[-4000:]}")
            return " ready." in worker.output()

        wait_for(ready, timeout=60, what="worker ready")
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp=tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def module_worker(tmp_path_factory: pytest.TempPathFactory, django_db_setup: Any) -> Iterator[WorkerProcess]:
    pool = Workers(tmp=tmp_path_factory.mktemp("worker"))
    worker = pool.start()
    yield worker
    pool.stop_all()


# Kafka ----------------------------------------------------------------------------------
# The Kafka delivery path's tests talk to a real broker: KAFKA_BOOTSTRAP_SERVERS when it
# names one that answers (a CI service, an Apache Kafka of yours), else a Tansu broker this
# run starts (project/kafkabroker.py). Each test gets topics and a group of its own.


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from project import kafkabroker

    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given and kafkabroker.answers(given, timeout=5.0):
        yield given
        return
    broker = kafkabroker.start(data_dir=tmp_path_factory.mktemp("kafka"))
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def kafka_topics() -> dict[str, str]:
    """This test's topic names and consumer group: ``topic``, ``high``, ``dead``, ``group``."""
    suffix = uuid.uuid4().hex[:12]
    return {
        "topic": f"notifications.deliver.{suffix}",
        "high": f"notifications.deliver.high.{suffix}",
        "dead": f"notifications.dead.{suffix}",
        "group": f"notifications.{suffix}",
    }


def kafka_settings(bootstrap: str, topics: dict[str, str]) -> dict[str, Any]:
    """The Django settings that put the delivery path on Kafka with these topics."""
    return {
        "NOTIFICATIONS_BROKER": "kafka",
        "NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "NOTIFICATIONS_KAFKA_TOPIC": topics["topic"],
        "NOTIFICATIONS_KAFKA_HIGH_TOPIC": topics["high"],
        "NOTIFICATIONS_KAFKA_DEAD_TOPIC": topics["dead"],
        "NOTIFICATIONS_KAFKA_GROUP": topics["group"],
    }


def kafka_env(bootstrap: str, topics: dict[str, str]) -> dict[str, str]:
    """The same for a worker or beat process a test starts (``workers.start(**kafka_env(...))``):
    project/settings.py reads these from the environment."""
    settings_ = kafka_settings(bootstrap, topics)
    env = {name: str(value) for name, value in settings_.items() if name != "NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS"}
    env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    return env


@pytest.fixture
def on_kafka(kafka_bootstrap: str, kafka_topics: dict[str, str]) -> Iterator[dict[str, str]]:
    """Run the test with the delivery path on Kafka (override_settings for this process;
    pass ``kafka_env(...)`` to the processes it starts). Yields the topic names and
    ``bootstrap``."""
    from django.test import override_settings

    with override_settings(**kafka_settings(kafka_bootstrap, kafka_topics)):
        yield {**kafka_topics, "bootstrap": kafka_bootstrap}
