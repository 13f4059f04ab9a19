"""Scheduling, expiry and priority, as a caller and the mail server see them: the relay
publishes only what is due, high priority first and in its own queue; a worker never
sends early or after expiry; a retry waits as a due outbox row."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from django.db import connection, transaction
from django.utils import timezone

from notifications import InvalidNotification, notify, notify_many, relay
from notifications.models import Notification, OutboxMessage, SentEmail
from tests.conftest import notification_kwargs, take_delivery_payloads, wait_for
from tests.smtp import Plan

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_wakeups(settings: Any) -> None:
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


@pytest.fixture
def relay_loop() -> Any:
    """Beat's relay loop, in this process."""
    loop = relay.start_loop()
    wait_for(relay.loop_alive, what="the relay loop's heartbeat")
    yield loop
    loop.stop.set()  # type: ignore[attr-defined]
    loop.join(timeout=10)


def test_a_scheduled_notification_waits_and_arrives_no_earlier_than_send_at(smtp_server, workers, relay_loop):
    workers.start(concurrency=1)
    send_at = timezone.now() + timedelta(seconds=3)
    n = notify(**notification_kwargs(), send_at=send_at)
    assert n.status == "scheduled"
    row = OutboxMessage.objects.get(notification=n)
    assert row.due_at == send_at and row.published_at is None
    [copy] = smtp_server.wait_received(n.key, timeout=30)
    assert copy.wall >= send_at.timestamp()  # the mail server's clock: not a moment early
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").exists())


def test_the_relay_publishes_nothing_before_it_is_due(no_wakeups):
    later = notify(**notification_kwargs(), send_at=timezone.now() + timedelta(minutes=5))
    now = notify(**notification_kwargs())
    assert relay.drain() == 1
    published = [p["key"] for batch in take_delivery_payloads() for p in batch]
    assert published == [now.key]
    later.refresh_from_db()
    assert later.status == "scheduled" and later.published_at is None


def test_the_claim_reads_no_scheduled_row(no_wakeups):
    """With 20,000 rows scheduled for later, the claim of what is due reads the index
    from its first due row and stops at the limit: no scheduled row is visited."""
    with connection.cursor() as cursor:
        cursor.execute(
            'WITH n AS (INSERT INTO notifications_notification (key, service, notification_id, user_id, "to", '
            "from_email, subject, body, html_body, metadata, send_at, status) "
            "SELECT 'bulk:' || g || ':1', 'bulk', g::text, '1', 'a@example.com', '', 's', 'b', '', '{}', "
            "now() + interval '1 day', 'scheduled' FROM generate_series(1, 20000) g RETURNING id, send_at) "
            "INSERT INTO notifications_outboxmessage (notification_id, due_at) SELECT id, send_at FROM n"
        )
        cursor.execute("ANALYZE notifications_outboxmessage")
    due = notify(**notification_kwargs())
    with transaction.atomic():
        [claimed] = OutboxMessage.objects.claim_pending(200, "default")
        assert claimed.notification_id == due.pk
    with connection.cursor() as cursor:
        cursor.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT o.id FROM notifications_outboxmessage o "
            "WHERE o.published_at IS NULL AND o.priority = 'normal' AND o.due_at <= now() "
            "ORDER BY o.due_at, o.id LIMIT 200 FOR UPDATE OF o SKIP LOCKED"
        )
        plan = cursor.fetchone()[0][0]["Plan"]

    def scans(node: dict[str, Any]) -> list[dict[str, Any]]:
        found = [node] if "Index Name" in node or node.get("Node Type") == "Seq Scan" else []
        for child in node.get("Plans", []):
            found += scans(child)
        return found

    [scan] = scans(plan)
    assert scan.get("Index Name") == "notifications_outbox_due"
    assert scan["Actual Rows"] == 1 and scan.get("Rows Removed by Filter", 0) == 0
    assert scan["Shared Hit Blocks"] + scan.get("Shared Read Blocks", 0) < 20


def test_high_priority_goes_first_and_into_its_own_queue(no_wakeups):
    normal = notify_many([notification_kwargs() for _ in range(250)])
    high = notify(**notification_kwargs(), priority="high")
    assert high.priority == "high"
    assert relay.relay_batch(batch_size=200) == 200  # one batch: the high one is in it
    [[carried]] = take_delivery_payloads(queue_name="notifications.deliver.high")
    assert carried["key"] == high.key and carried["priority"] == "high"
    assert all(p["priority"] == "normal" for batch in take_delivery_payloads() for p in batch)
    assert OutboxMessage.objects.filter(published_at__isnull=True).count() == 51
    assert {n.status for n in Notification.objects.filter(pk__in=[n.pk for n in normal])} == {"created", "published"}


def test_a_worker_consumes_the_high_queue_by_default(smtp_server, workers, no_wakeups):
    workers.start(concurrency=1)
    n = notify(**notification_kwargs(), priority="high")
    relay.drain()
    smtp_server.wait_received(n.key)


def test_an_expired_notification_is_never_sent_and_ends_expired(smtp_server, workers, no_wakeups):
    n = notify(**notification_kwargs(), expires_at=timezone.now() + timedelta(seconds=1.5))
    relay.drain()  # published while still valid; no worker yet
    time.sleep(1.6)  # the expiry is the subject of the test: the worker starts after it
    workers.start(concurrency=1)
    wait_for(lambda: Notification.objects.filter(key=n.key, status="expired").exists(), timeout=30)
    assert smtp_server.count(n.key) == 0
    assert SentEmail.objects.get(key=n.key).state == "expired"
    assert "expired" in Notification.objects.get(key=n.key).last_error


def test_a_payload_published_early_goes_back_to_wait_for_its_send_at(smtp_server, workers, no_wakeups):
    """A message that carries a notification before its send_at (a relay whose clock is
    ahead, an earlier release) is not sent: it goes back to the outbox, due then."""
    from notifications import broker

    send_at = timezone.now() + timedelta(seconds=2)
    n = notify(**notification_kwargs(), send_at=send_at)
    OutboxMessage.objects.filter(notification=n).update(published_at=timezone.now())  # as if published early
    broker.publish_deliveries(current_app, [_payload(n)])
    workers.start(concurrency=1)
    back = wait_for(lambda: OutboxMessage.objects.filter(notification=n, published_at__isnull=True).first())
    assert abs((back.due_at - send_at).total_seconds()) < 1.0  # due at its send_at (and a little jitter)
    loop = relay.start_loop()
    try:
        [copy] = smtp_server.wait_received(n.key, timeout=30)
    finally:
        loop.stop.set()  # type: ignore[attr-defined]
        loop.join(timeout=10)
    assert copy.wall >= send_at.timestamp()
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent", attempts=1).exists())


def test_a_retry_is_a_due_outbox_row(smtp_server, workers, no_wakeups):
    """A transient failure puts the notification back in the outbox, due after its
    backoff, where an operator sees it; the relay publishes it then."""
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="451 4.3.0 try again later"))
    n = notify(**kwargs)
    relay.drain()
    workers.start(concurrency=1)
    waiting = wait_for(
        lambda: OutboxMessage.objects.filter(notification=n, published_at__isnull=True).first(), timeout=30
    )
    assert waiting.due_at > waiting.created_at
    assert Notification.objects.get(pk=n.pk).status == "retrying"
    loop = relay.start_loop()
    try:
        smtp_server.wait_received(n.key, timeout=30)
    finally:
        loop.stop.set()  # type: ignore[attr-defined]
        loop.join(timeout=10)
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent", attempts=2).exists())
    assert smtp_server.count(n.key) == 1


def test_a_countdown_message_of_an_earlier_release_is_delivered_at_its_time(smtp_server, workers, no_wakeups):
    """Earlier releases retried with Celery countdown messages: one still in the queue is
    delivered once its time comes, not before."""
    from notifications import broker

    n = notify(**notification_kwargs())
    OutboxMessage.objects.filter(notification=n).update(published_at=timezone.now())
    payload = _payload(n)
    for name in ("template", "language", "send_at", "expires_at", "priority", "backend"):
        payload.pop(name, None)  # what an earlier release's message carried
    sent = time.time()
    current_app.send_task(
        broker.DELIVER_MANY_TASK,
        args=[[payload]],
        queue="notifications.deliver",
        routing_key="notifications.deliver",
        countdown=2,
    )
    workers.start(concurrency=1)
    [copy] = smtp_server.wait_received(n.key, timeout=30)
    assert copy.wall >= sent + 2 - 0.05


def _payload(n: Notification) -> dict[str, Any]:
    """The notification as a broker message carries it."""
    from notifications.managers import PAYLOAD_COLUMNS

    payload: dict[str, Any] = {c: getattr(n, c) for c in PAYLOAD_COLUMNS}
    payload["metadata"] = "{}"
    payload["created_at"] = n.created_at.isoformat()
    for name in ("send_at", "expires_at"):
        payload[name] = payload[name].isoformat() if payload[name] else None
    return payload


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"send_at": "tomorrow"}, "send_at"),
        ({"send_at": timezone.now().replace(tzinfo=None)}, "send_at"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "expires_at"),
        (
            {"send_at": timezone.now() + timedelta(hours=2), "expires_at": timezone.now() + timedelta(hours=1)},
            "expires_at",
        ),
        ({"send_at": timezone.now() + timedelta(days=400)}, "send_at"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": 1}, "priority"),
        ({"backend": "nope"}, "backend"),
        ({"language": "de\nX"}, "language"),
        ({"context": {"a": 1}}, "context"),
    ],
)
def test_bad_schedule_priority_or_backend_is_refused_and_writes_nothing(kwargs, field):
    with pytest.raises(InvalidNotification) as caught:
        notify(**notification_kwargs(), **kwargs)
    assert caught.value.field == field
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


def test_a_repeat_with_another_send_time_is_a_conflict():
    from notifications import NotificationConflict

    kwargs = notification_kwargs()
    notify(**kwargs, send_at=timezone.now() + timedelta(hours=1))
    with pytest.raises(NotificationConflict) as caught:
        notify(**kwargs, send_at=timezone.now() + timedelta(hours=2))
    assert caught.value.fields == ("send_at",)
    same = notify(**kwargs, send_at=Notification.objects.get().send_at)
    assert same.pk == Notification.objects.get().pk


def test_a_row_an_earlier_release_wrote_without_a_due_time_is_published(no_wakeups):
    n = notify(**notification_kwargs())
    OutboxMessage.objects.filter(notification=n).update(due_at=None)
    assert relay.drain() == 1
    assert [p["key"] for batch in take_delivery_payloads() for p in batch] == [n.key]
