"""Structured logs: with NOTIFICATIONS_LOG_FORMAT=json every line is one JSON object, and
one notification can be followed by its key from the caller's notify() through beat's
relay to the worker that sent it; beat serves its own counters too. Off by default."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from notifications import notify, relay
from notifications.conf import settings as conf
from notifications.logs import JsonFormatter
from tests.conftest import ROOT, child_env, notification_kwargs, wait_for
from tests.test_metrics import answers, delta, free_port, scrape

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_formatter_writes_one_json_object_with_the_extra_fields():
    record = logging.LogRecord("notifications.events", logging.INFO, __file__, 1, "sent %s", ("k:1:2",), None)
    record.key, record.attempt, record.latency_seconds = "k:1:2", 1, 0.25
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line.split('"exc_info"')[0]
    data = json.loads(line)
    assert data["message"] == "sent k:1:2" and data["logger"] == "notifications.events" and data["level"] == "INFO"
    assert (data["key"], data["attempt"], data["latency_seconds"]) == ("k:1:2", 1, 0.25)
    assert data["time"].endswith("+00:00") and data["pid"] > 0 and data["host"]
    assert "ValueError: boom" in data["exc_info"]
    assert json.loads(JsonFormatter().format(logging.makeLogRecord({"msg": "x", "when": object()})))["when"]


def test_event_lines_are_off_by_default():
    """The tests run the project's settings in text mode: the events logger is quiet, so
    the pipeline builds no line."""
    from notifications import events

    assert not events.enabled()


def _json_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            found.append(json.loads(line[start:]))
        except ValueError:
            continue
    return found


@pytest.fixture
def json_beat(tmp_path: Path, redis_client: Any) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """``celery -A project beat`` with JSON logs and its metrics server: its relay loop
    publishes what notify() commits."""
    port = free_port()
    log = tmp_path / "beat.log"
    env = child_env(NOTIFICATIONS_LOG_FORMAT="json", NOTIFICATIONS_METRICS_PORT=str(port))
    cmd = [sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "info"]
    cmd += ["-s", str(tmp_path / "schedule"), "--pidfile", str(tmp_path / "beat.pid")]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: answers(port) or proc.poll() is not None, timeout=60, what="beat's metrics server")
        assert proc.poll() is None, log.read_text()
        wait_for(relay.loop_alive, timeout=30, what="beat's relay loop")
        yield proc, log, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Its loop's heartbeat would outlive it and leave the next test's wake-ups unheard.
        redis_client.delete(f"{conf.REDIS_KEY_PREFIX}{relay.key(relay.LOOP_ALIVE)}")


def test_one_notification_is_followed_by_its_key_across_caller_relay_and_worker(smtp_server, workers, json_beat):
    _, beat_log, beat_port = json_beat
    worker = workers.start(concurrency=1, NOTIFICATIONS_LOG_FORMAT="json")
    beat_before = scrape(beat_port)

    # The caller: this process, with the JSON formatter on the events logger.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    events_logger = logging.getLogger("notifications.events")
    level = events_logger.level
    events_logger.addHandler(handler)
    events_logger.setLevel(logging.INFO)
    try:
        n = notify(**notification_kwargs())
    finally:
        events_logger.removeHandler(handler)
        events_logger.setLevel(level)
    smtp_server.wait_received(n.key)

    def lines(text: str, event: str) -> list[dict[str, Any]]:
        return [d for d in _json_lines(text) if d.get("event") == event and d.get("key") == n.key]

    [created] = lines(stream.getvalue(), "created")
    published = wait_for(lambda: lines(beat_log.read_text(), "published"), timeout=20, what="beat's published line")
    sent = wait_for(lambda: lines(worker.output(), "sent"), timeout=20, what="the worker's sent line")
    [claimed] = lines(worker.output(), "claimed")
    assert created["notification_id"] == published[0]["notification_id"] == claimed["notification_id"] == n.pk
    assert sent[0]["notification_id"] == n.pk and sent[0]["attempt"] == claimed["attempt"] == 1
    assert sent[0]["worker"] == claimed["worker"] and sent[0]["worker"].endswith(f":{claimed['pid']}")
    assert 0 < sent[0]["latency_seconds"] < 20 and published[0]["latency_seconds"] >= 0
    assert created["logger"] == published[0]["logger"] == sent[0]["logger"] == "notifications.events"
    # Every line of the worker's log is JSON, Celery's own too.
    assert any(d.get("logger", "").startswith("celery") for d in _json_lines(worker.output()))

    # Beat's own exposition server counted what its relay loop published.
    def counted() -> bool:
        return delta(scrape(beat_port), beat_before, "notifications_published_total") >= 1

    wait_for(counted, timeout=10, what="beat's published count")
    assert scrape(beat_port)[("notifications_relay_pass_seconds_count", frozenset())] > 0
