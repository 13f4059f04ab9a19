"""Metrics: what /metrics and a worker's exposition server report must agree with the
rows in the database, after traffic through real workers and a real SMTP server, and
after a pool process is killed mid-send; gauges equal notifications.status and the
real queue depth; labels stay bounded; and only allowed callers may read them."""

from __future__ import annotations

import base64
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.db.models import Sum
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from notifications import broker, exposition, metrics, notify, notify_many, relay, status
from notifications.conf import settings as conf
from notifications.managers import NOTIFICATION_COLUMNS
from notifications.models import Notification, OutboxMessage, Priority, SentEmail, Status
from tests.conftest import Workers, notification_kwargs, take_delivery_payloads, wait_for
from tests.smtp import Plan
from tests.test_health import kafka_server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def web(client: Any, **extra: Any) -> Samples:
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1", **extra)
    assert response.status_code == 200, response.content
    return parse(response.content.decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


def answers(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def _payload(n: Notification) -> dict[str, Any]:
    return {**{c: getattr(n, c) for c in NOTIFICATION_COLUMNS}, "created_at": n.created_at.isoformat()}


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# Without a worker: the gauges, the broker's queue, access. These run before the module's
# worker starts (it is module-scoped and first requested further down), so the queue
# depth is the real depth of messages nobody consumes.


def test_gauges_equal_the_status_figures_and_the_real_queue_depth(client, settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    settings.NOTIFICATIONS_RELAY_BATCH_SIZE = 100
    take_delivery_payloads()  # whatever an earlier module left in the queue
    before = web(client)
    notify_many([notification_kwargs() for _ in range(100)])
    assert relay.drain() == 100  # one pass, 100 rows, two messages of 50
    late = [notify(**notification_kwargs()) for _ in range(3)]
    OutboxMessage.objects.filter(notification=late[0]).update(created_at=timezone.now() - timedelta(seconds=30))
    OutboxMessage.objects.create(notification=late[1], due_at=timezone.now() + timedelta(hours=1))
    Notification.objects.filter(pk=late[2].pk).update(status="ambiguous")

    after = web(client)
    waiting = broker.deliveries_waiting(current_app)  # the broker's own count, asked directly
    assert waiting == 2
    assert value(after, "notifications_queue_messages", queue="notifications.deliver", role="deliver") == waiting
    assert value(after, "notifications_queue_consumers", queue="notifications.deliver", role="deliver") == 0
    assert value(after, "notifications_broker_up") == 1 and value(after, "notifications_database_up") == 1
    counts = status.counts_by_status()
    assert counts["published"] == 100 and counts["created"] == 2
    for name, count in counts.items():
        assert value(after, "notifications_by_status", status=name) == count
    backlog = status.backlog()
    assert (backlog.due, backlog.scheduled) == (3, 1)
    assert value(after, "notifications_outbox_backlog_rows", state="due") == backlog.due
    assert value(after, "notifications_outbox_backlog_rows", state="scheduled") == backlog.scheduled
    assert value(after, "notifications_outbox_oldest_due_age_seconds") == pytest.approx(backlog.oldest_due_age, abs=2)
    assert value(after, "notifications_held_ambiguous") == status.held_count() == 1
    assert value(after, "notifications_stuck_claims") == status.stuck_claims() == 0
    # This process's counters: what it created and published, and the pass that did it.
    assert delta(after, before, "notifications_created_total") == 103
    assert delta(after, before, "notifications_published_total") == 100
    assert delta(after, before, "notifications_messages_published_total") == 2
    assert delta(after, before, "notifications_relay_pass_rows_count") == 1
    assert delta(after, before, "notifications_relay_pass_rows_sum") == 100
    take_delivery_payloads()


def purge_high_queue() -> int:
    """Empty the high-priority delivery queue (declaring it first); how many it held."""
    with current_app.connection_for_write() as conn:
        for declared in broker.queues():
            declared(conn.default_channel).declare()
        return int(conn.default_channel.queue_purge(conf.HIGH_QUEUE) or 0)


def test_the_gauges_show_the_new_states_the_high_queue_and_what_waits_for_later(client, settings):
    from notifications import cancel

    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    take_delivery_payloads()
    purge_high_queue()
    before = web(client)
    now = timezone.now()
    notify(**notification_kwargs(send_at=now + timedelta(hours=1)))
    notify(**notification_kwargs(send_at=now + timedelta(minutes=10), priority="high"))
    stopped = notify(**notification_kwargs(send_at=now + timedelta(hours=1)))
    assert cancel(stopped.key).in_time
    expired = notify(**notification_kwargs())
    OutboxMessage.objects.filter(notification=expired).update(published_at=now)
    Notification.objects.filter(pk=expired.pk).update(status="expired")
    notify(**notification_kwargs(priority="high"))
    assert relay.drain() == 1  # the one due now, into the high-priority queue
    high = conf.HIGH_QUEUE
    try:
        wait_for(lambda: (exposition.broker_queues() or {}).get("deliver_high", ("", 0, 0))[1] == 1, what="queued")
        after = web(client)
    finally:
        assert purge_high_queue() == 1
    assert {labels for name, labels in after if name == "notifications_by_status"} == {
        frozenset({("status", choice.value)}) for choice in Status
    }
    for name, count in (("scheduled", 2), ("expired", 1), ("cancelled", 1), ("published", 1)):
        assert value(after, "notifications_by_status", status=name) == count, name
    assert value(after, "notifications_scheduled_waiting", priority="high") == 1
    assert value(after, "notifications_scheduled_waiting", priority="normal") == 1
    assert value(after, "notifications_outbox_backlog_rows", state="scheduled") == 2
    assert 590 < value(after, "notifications_scheduled_next_due_seconds") <= 600
    assert value(after, "notifications_queue_messages", queue=high, role="deliver_high") == 1
    assert value(after, "notifications_queue_consumers", queue=high, role="deliver_high") == 0
    assert value(after, "notifications_queue_messages", queue="notifications.deliver", role="deliver") == 0
    # The delivery outcomes of the new states, and the cancels, are series from the start.
    for outcome in ("expired", "cancelled"):
        assert ("notifications_deliveries_total", frozenset({("outcome", outcome)})) in after, outcome
    assert delta(after, before, "notifications_cancelled_total", in_time="true") == 1
    assert ("notifications_cancelled_total", frozenset({("in_time", "false")})) in after


def test_nothing_waiting_for_later_gives_no_next_due_sample(client, settings):
    after = web(client)
    assert value(after, "notifications_scheduled_waiting", priority="high") == 0
    assert not [name for name, _ in after if name == "notifications_scheduled_next_due_seconds"]


def test_the_by_status_gauge_counts_exactly_up_to_its_limit_then_estimates(client, settings, monkeypatch):
    """The gauge reads the dashboard's bounded counts: a status past the limit gets
    PostgreSQL's estimate (and says so), the others stay exact."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    monkeypatch.setattr(exposition, "EXACT_COUNTS_UP_TO", 2)
    made = [notify(**notification_kwargs()) for _ in range(5)]
    Notification.objects.filter(pk__in=[n.pk for n in made[:4]]).update(status="failed")
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE notifications_notification")
    after = web(client)
    assert value(after, "notifications_by_status_estimated", status="failed") == 1
    assert 3 <= value(after, "notifications_by_status", status="failed") <= 6  # the planner's figure, past 2
    assert value(after, "notifications_by_status_estimated", status="created") == 0
    assert value(after, "notifications_by_status", status="created") == 1
    assert value(after, "notifications_by_status", status="sent") == 0


def test_a_rolled_back_notify_counts_nothing_and_a_refused_row_counts_as_oversized(client, settings):
    from django.db import transaction

    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    take_delivery_payloads()
    before = web(client)
    with pytest.raises(RuntimeError), transaction.atomic():
        notify(**notification_kwargs())
        raise RuntimeError("the caller's transaction fails")
    assert delta(web(client), before, "notifications_created_total") == 0

    big = notify(**notification_kwargs(body="\x01" * 200_000))  # 1.2 MB as escaped JSON
    notify(**notification_kwargs())
    settings.NOTIFICATIONS_MAX_MESSAGE_BYTES = 1_000_000
    assert relay.relay_batch() == 2
    after = web(client)
    assert Notification.objects.get(pk=big.pk).status == "failed"
    assert delta(after, before, "notifications_created_total") == 2
    assert delta(after, before, "notifications_failures_total", reason="oversized") == 1
    assert delta(after, before, "notifications_deliveries_total", outcome="failed") == 1
    assert delta(after, before, "notifications_published_total") == 2  # both rows leave the outbox
    assert value(after, "notifications_by_status", status="failed") == 1
    take_delivery_payloads()


def test_a_broker_that_is_away_or_silent_costs_the_scrape_at_most_its_timeout():
    silent = socket.socket()  # accepts connections, never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = free_port()  # nobody listens
    try:
        for url in (
            f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}//",
            f"amqp://guest:guest@127.0.0.1:{closed}//",
        ):
            began = time.monotonic()
            found = parse_collected(exposition.PipelineCollector(broker_url=url, timeout=1.0))
            assert time.monotonic() - began < 3.0
            assert value(found, "notifications_broker_up") == 0
            assert value(found, "notifications_database_up") == 1  # the database's gauges are still there
            assert not any(name == "notifications_queue_messages" for name, _ in found)
    finally:
        silent.close()


def parse_collected(collector: Any) -> Samples:
    from prometheus_client import generate_latest

    return parse(generate_latest(collector).decode())


def test_metrics_refuse_callers_that_are_not_loopback_staff_or_holding_the_token(client, settings, django_user_model):
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    refused = client.get("/metrics", **remote)
    assert refused.status_code == 401 and "Bearer" in refused["WWW-Authenticate"]
    assert b"notifications_" not in refused.content
    # Through a proxy on this host the caller is not local, whatever REMOTE_ADDR says.
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything", **remote).status_code == 401  # no token set

    settings.NOTIFICATIONS_OPS_TOKEN = "s3cret-token"
    ok = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token", **remote)
    assert ok.status_code == 200 and b"notifications_deliveries_total" in ok.content
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-tokeN", **remote).status_code == 401
    basic = base64.b64encode(b"prometheus:s3cret-token").decode()
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {basic}", **remote).status_code == 200
    wrong = base64.b64encode(b"prometheus:nope").decode()
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {wrong}", **remote).status_code == 401

    user = django_user_model.objects.create_user("viewer", password="pw-viewer-1")
    client.force_login(user)
    assert client.get("/metrics", **remote).status_code == 403
    user.is_staff = True
    user.save()
    assert client.get("/metrics", **remote).status_code == 200
    client.logout()

    settings.NOTIFICATIONS_OPS_LOOPBACK = False  # behind a proxy that adds no header
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 401


def test_the_worker_exposition_server_refuses_other_hosts_without_the_token(settings):
    from wsgiref.util import setup_testing_defaults

    app = exposition._guard(exposition._wsgi_app())
    answers: list[str] = []

    def call(**environ: str) -> str:
        setup_testing_defaults(environ)
        body = b"".join(app(environ, lambda status, headers: answers.append(status)))
        return answers[-1] + " " + body.decode()[:200]

    assert call(REMOTE_ADDR="127.0.0.1").startswith("200")
    assert call(REMOTE_ADDR="192.0.2.7").startswith("401")
    settings.NOTIFICATIONS_OPS_TOKEN = "t0ken"
    assert call(REMOTE_ADDR="192.0.2.7", HTTP_AUTHORIZATION="Bearer t0ken").startswith("200")
    assert call(REMOTE_ADDR="192.0.2.7", HTTP_AUTHORIZATION="Bearer t0kem").startswith("401")


# With a real worker (prefork, two pool processes) serving its metrics.


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, django_db_setup: Any) -> Iterator[tuple[Workers, int, Path]]:
    """A worker whose main process serves the counters of its pool processes."""
    tmp = tmp_path_factory.mktemp("metered")
    port, directory = free_port(), tmp / "multiproc"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"\0" * 16)  # a file of an earlier run: cleared at start
    pool = Workers(tmp=tmp)
    pool.start(concurrency=2, PROMETHEUS_MULTIPROC_DIR=str(directory), NOTIFICATIONS_METRICS_PORT=str(port))
    wait_for(lambda: answers(port), timeout=20, what="the worker's metrics server")
    yield pool, port, directory
    pool.stop_all()


def _finished(keys: list[str], timeout: float = 60.0) -> dict[str, str]:
    def done() -> dict[str, str] | None:
        found = dict(Notification.objects.filter(key__in=keys).values_list("key", "status"))
        return found if len(found) == len(keys) and set(found.values()) <= {"sent", "failed"} else None

    return wait_for(done, timeout=timeout, what="every notification sent or failed")  # type: ignore[no-any-return]


def test_worker_counters_agree_with_the_database_after_traffic(smtp_server, metered, client):
    _, port, directory = metered
    assert not (directory / "counter_999999.db").exists()
    worker_before, web_before = scrape(port), web(client)

    batch = notify_many([notification_kwargs() for _ in range(30)])
    singles = [notify(**notification_kwargs()) for _ in range(4)]
    repeated = notification_kwargs()
    singles.append(notify(**repeated))
    assert notify(**repeated).pk == singles[-1].pk  # a repeat: the same notification, nothing written
    bounce = notify(**notification_kwargs(user_id="bounce-1"))  # the server answers 550
    deferred = notification_kwargs()
    smtp_server.plan(f"tests:{deferred['notification_id']}:42", Plan(reply="451 4.3.0 try again later"))
    singles.append(notify(**deferred))
    keys = [n.key for n in [*batch, *singles, bounce]]
    final = _finished(keys)
    sent = Notification.objects.filter(status="sent").count()
    assert sent == 36 and list(final.values()).count("failed") == 1

    def settled() -> Samples | None:
        samples = scrape(port)
        return (
            samples if delta(samples, worker_before, "notifications_deliveries_total", outcome="sent") == sent else None
        )

    after = wait_for(settled, timeout=10, what="the worker's sent count")
    assert delta(after, worker_before, "notifications_deliveries_total", outcome="failed") == 1
    assert delta(after, worker_before, "notifications_failures_total", reason="rejected") == 1
    assert Notification.objects.filter(status="failed", last_error__startswith="550").count() == 1
    assert delta(after, worker_before, "notifications_deliveries_total", outcome="retried") == 1
    assert Notification.objects.get(key=singles[-1].key).attempts == 2
    assert delta(after, worker_before, "notifications_delivery_latency_seconds_count") == sent
    assert delta(after, worker_before, "notifications_ambiguous_total", action="resend") == 0
    opened = delta(after, worker_before, "notifications_smtp_connections_total", result="opened")
    reused = delta(after, worker_before, "notifications_smtp_connection_reuses_total")
    assert opened >= 1 and reused >= sent - opened and reused > 0

    web_after = web(client)
    assert delta(web_after, web_before, "notifications_created_total") == len(keys) == 37
    assert delta(web_after, web_before, "notifications_dedupe_hits_total") == 1
    # The relay ran in the worker (the wake-up's task) and perhaps here: every outbox row
    # the database shows published was counted once, somewhere. The deferred one's retry
    # is an outbox row of its own.
    published = delta(after, worker_before, "notifications_published_total") + delta(
        web_after, web_before, "notifications_published_total"
    )
    assert published == OutboxMessage.objects.filter(published_at__isnull=False).count() == len(keys) + 1

    # A redelivery of a sent notification is skipped, and counted so.
    again = Notification.objects.get(key=batch[0].key)
    broker.publish_deliveries(current_app, [_payload(again)])
    wait_for(
        lambda: delta(scrape(port), after, "notifications_deliveries_total", outcome="duplicate") == 1,
        timeout=20,
        what="the redelivery counted as a duplicate",
    )
    assert smtp_server.count(again.key) == 1


def test_labels_stay_bounded_after_traffic(smtp_server, metered, client):
    """After sends, a bounce, a deferral and a repeat, every label of ours takes a value
    from its fixed vocabulary: never a key, an address or anything else a caller chose."""
    _, port, _ = metered
    odd = notification_kwargs(to="Zoë <zoe+tag@example.org>", user_id="label-user")
    deferred = notification_kwargs(notification_id="label-deferred")
    smtp_server.plan(f"tests:{deferred['notification_id']}:42", Plan(reply="452 4.2.2 mailbox full"))
    made = [notify(**odd), notify(**odd), notify(**notification_kwargs(user_id="bounce-label")), notify(**deferred)]
    keys = sorted({n.key for n in made})  # the repeat is the same notification
    assert len(keys) == 3
    _finished(keys)
    assert_bounded([scrape(port), web(client)], [*keys, "zoe+tag@example.org", "label-user"])


def assert_bounded(scrapes: list[Samples], chosen: list[str]) -> None:
    """Every label of a ``notifications_*`` series has a known name and a value from its
    vocabulary, and none contains what a caller chose (``chosen``)."""
    allowed = {
        "outcome": set(metrics.OUTCOMES),
        "reason": set(metrics.FAILURE_REASONS),
        "action": set(metrics.AMBIGUOUS_ACTIONS),
        "cause": set(metrics.BATCH_RETRY_CAUSES),
        "result": set(metrics.SMTP_RESULTS),
        "status": {choice.value for choice in Status},
        "state": {"due", "scheduled"},
        "priority": {choice.value for choice in Priority},
        "in_time": {"true", "false"},
        "queue": set(exposition.queue_roles().values()),
        "role": set(exposition.queue_roles()),
        "le": None,
        "quantile": None,
    }
    seen = 0
    for samples in scrapes:
        for name, labels in samples:
            if not name.startswith("notifications_"):
                continue
            for label, label_value in labels:
                assert label in allowed, (name, label)
                vocabulary = allowed[label]
                assert vocabulary is None or label_value in vocabulary, (name, label, label_value)
                assert "@" not in label_value and not any(text in label_value for text in chosen)
                seen += 1
    assert seen > 0


def test_counts_of_a_pool_process_killed_mid_send_stay_and_agree_with_the_database(smtp_server, metered):
    """SIGKILL of the pool process that is handing an email over: the pool replaces it, the
    message goes to the other process, which takes the claim over once the lease runs out
    and, the outcome being unknown, resends. The killed process's earlier counts stay in
    the worker's totals, and every count agrees with the rows."""
    pool, port, directory = metered
    before = scrape(port)
    warm = [notify(**notification_kwargs()) for _ in range(10)]
    _finished([n.key for n in warm])
    wait_for(lambda: delta(scrape(port), before, "notifications_deliveries_total", outcome="sent") == 10, timeout=10)

    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))  # the server has it; the reply waits
    smtp_server.wait_started(n.key)
    owner = SentEmail.objects.get(key=n.key).owner
    victim = int(owner.rsplit(":", 1)[1])
    worker = pool.started[0]
    assert victim in worker.children()
    os.kill(victim, signal.SIGKILL)
    release.set()
    sent = wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").first(), timeout=60)
    assert worker.proc.poll() is None and victim not in worker.children()
    assert (directory / f"counter_{victim}.db").exists()  # a dead process's counts stay in the totals

    def agreed() -> Samples | None:
        samples = scrape(port)
        return samples if delta(samples, before, "notifications_deliveries_total", outcome="sent") == 11 else None

    after = wait_for(agreed, timeout=10, what="the takeover's send counted")
    assert Notification.objects.filter(status="sent").count() == 11
    assert sent.ambiguous_count == 1 == Notification.objects.aggregate(n=Sum("ambiguous_count"))["n"]
    assert delta(after, before, "notifications_ambiguous_total", action="resend") == 1
    claim = SentEmail.objects.get(key=n.key)
    assert claim.token == 2 and delta(after, before, "notifications_claim_takeovers_total") == 1
    assert delta(after, before, "notifications_delivery_latency_seconds_count") == 11
    assert smtp_server.count(n.key) == 2  # the one window: the first copy had reached the server


# With NOTIFICATIONS_BROKER=kafka: the delivery "queues" are topics, their depth the lag.


@pytest.fixture
def kafka_topics(kafka_server: str, settings: Any) -> Iterator[tuple[str, str]]:  # noqa: F811 (the fixture)
    """BROKER=kafka on the test's broker, with delivery topics (one partition each) and a
    group of this test's own; the module's cached clients are dropped before and after."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from notifications import kafka
    from tests.conftest import unique

    high, normal = unique("deliver-high"), unique("deliver")
    settings.NOTIFICATIONS_BROKER = "kafka"
    settings.NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS = kafka_server
    settings.NOTIFICATIONS_KAFKA_TOPIC = normal
    settings.NOTIFICATIONS_KAFKA_HIGH_TOPIC = high
    settings.NOTIFICATIONS_KAFKA_GROUP = unique("group")
    kafka._reset()
    client = AdminClient({"bootstrap.servers": kafka_server})
    for future in client.create_topics(
        [NewTopic(t, num_partitions=1, replication_factor=1) for t in (high, normal)]
    ).values():
        future.result(timeout=15)
    yield high, normal
    kafka._reset()


def test_with_kafka_the_delivery_gauges_are_the_topics_lag_and_assigned_consumers(client, kafka_topics):
    from confluent_kafka import Consumer, Producer

    from notifications import kafka

    high, normal = kafka_topics
    producer = Producer({"bootstrap.servers": conf.KAFKA_BOOTSTRAP_SERVERS, "enable.idempotence": True})
    for topic, count in ((normal, 4), (high, 2)):
        for i in range(count):
            producer.produce(topic, key=f"user-{i}".encode(), value=b"{}")
    assert producer.flush(15) == 0

    # Four messages in the normal topic's one partition, none committed: three wait behind
    # the first (which a consumer would be working on).
    wait_for(lambda: kafka.lag_by_topic() == {high: 1, normal: 3}, timeout=20, what=kafka.lag_by_topic)
    found = web(client)
    assert value(found, "notifications_broker_up") == 1
    assert value(found, "notifications_queue_messages", queue=normal, role="deliver") == 3
    assert value(found, "notifications_queue_messages", queue=high, role="deliver_high") == 1
    assert value(found, "notifications_queue_consumers", queue=normal, role="deliver") == 0
    # Celery's broker still carries the relay queue; deliveries have no dead letters there.
    assert {dict(labels).get("role") for name, labels in found if name == "notifications_queue_messages"} == {
        "deliver",
        "deliver_high",
        "relay",
    }

    consumer = Consumer(
        {
            "bootstrap.servers": conf.KAFKA_BOOTSTRAP_SERVERS,
            "group.id": conf.KAFKA_GROUP,
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([normal])
        message = wait_for(lambda: consumer.poll(0.2), timeout=30, what="a message of the normal topic")
        consumer.commit(message=message, asynchronous=False)  # the first is done: two wait behind the second
        wait_for(lambda: kafka.lag_by_topic()[normal] == 2, timeout=20, what=kafka.lag_by_topic)
        found = web(client)
        assert value(found, "notifications_queue_messages", queue=normal, role="deliver") == 2
        assert value(found, "notifications_queue_consumers", queue=normal, role="deliver") == 1
        assert value(found, "notifications_queue_consumers", queue=high, role="deliver_high") == 0
    finally:
        consumer.close()


def test_with_kafka_a_broker_that_is_away_costs_the_scrape_at_most_its_timeout(settings):
    from notifications import kafka

    settings.NOTIFICATIONS_BROKER = "kafka"
    settings.NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS = f"127.0.0.1:{free_port()}"
    kafka._reset()
    try:
        began = time.monotonic()
        found = parse_collected(exposition.PipelineCollector(timeout=1.0))
        assert time.monotonic() - began < 3.0
        assert value(found, "notifications_broker_up") == 0
        assert value(found, "notifications_database_up") == 1
        assert not any(name == "notifications_queue_messages" for name, _ in found)
    finally:
        kafka._reset()
