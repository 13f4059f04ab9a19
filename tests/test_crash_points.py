"""Deterministic crashes inside the narrow windows of delivery, and the poison-message bound."""

from __future__ import annotations

import datetime as dt

import pytest
from celery import current_app
from django.utils import timezone

from notifications import notify
from notifications.models import Notification, SentEmail
from notifications.relay import recover_stalled
from tests.conftest import delivery_outcomes, notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def queue_depth(name: str) -> int:
    """Messages ready in ``name``; 0 while nobody has declared it yet."""
    from amqp.exceptions import NotFound

    with current_app.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)
        except NotFound:
            return 0


def _sent(key: str, timeout: float = 40.0) -> Notification:
    return wait_for(lambda: Notification.objects.filter(key=key, status="sent").first(), timeout=timeout)


def test_crash_after_reply_resends_once_with_same_message_id(smtp_server, workers):
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    first = workers.start(concurrency=1, NOTIFICATIONS_CRASH_POINTS=f"after_reply={key}")
    notify(**kwargs)
    smtp_server.wait_received(key, 1)  # accepted; the child dies before recording it
    wait_for(lambda: "SIGKILL" in first.output() or "Process 'ForkPoolWorker" in first.output(), timeout=20)
    first.kill()
    workers.start()  # unarmed: takes over after the lease, sees the unknown outcome
    sent = _sent(key)
    copies = smtp_server.messages(key)
    assert len(copies) == 2 and copies[0].message_id == copies[1].message_id == sent.message_id
    assert sent.ambiguous_count == 1


def test_crash_after_record_sends_nothing_more(smtp_server, workers):
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    first = workers.start(concurrency=1, NOTIFICATIONS_CRASH_POINTS=f"after_record={key}")
    notify(**kwargs)
    _sent(key)  # recorded, then the child dies before the ack
    wait_for(lambda: "SIGKILL" in first.output() or "Process 'ForkPoolWorker" in first.output(), timeout=20)
    first.kill()
    workers.start()
    wait_for(lambda: "duplicate" in delivery_outcomes(key), timeout=30, what="redelivery recognised as duplicate")
    assert smtp_server.count(key) == 1
    assert Notification.objects.get(key=key).ambiguous_count == 0


def test_message_that_kills_its_worker_every_time_is_dead_lettered(smtp_server, workers):
    poison = notification_kwargs(notification_id=f"poison-{notification_kwargs()['notification_id']}")
    key = f"tests:{poison['notification_id']}:42"
    before = queue_depth("notifications.dead")
    worker = workers.start(concurrency=1, NOTIFICATIONS_CRASH_POINTS=f"before_claim={key}")
    notify(**poison)
    # Delivery limit 3 in tests/settings.py: the fourth return dead-letters it.
    wait_for(lambda: queue_depth("notifications.dead") > before, timeout=60, what="message dead-lettered")
    assert worker.proc.poll() is None  # the pool replaced its children; the worker lives
    healthy = notify(**notification_kwargs())
    smtp_server.wait_received(healthy.key)
    assert smtp_server.count(key) == 0

    # Beat's dead-letter pass makes it visible where people look: failed, with the reason.
    from notifications import deadletters

    assert key in deadletters.settle()
    failed = Notification.objects.get(key=key)
    assert failed.status == "failed" and "dead-lettered" in failed.last_error
    assert SentEmail.objects.get(key=key).state == "failed"
    assert queue_depth("notifications.dead") == 0  # settled, nothing left in the way


def test_stalled_claim_is_requeued_and_delivered_once(smtp_server, workers):
    """A retry whose message was lost (say its publish failed) is found and requeued."""
    kwargs = notification_kwargs()
    n = notify(**kwargs)
    Notification.objects.filter(pk=n.pk).update(status="retrying", attempts=1)
    long_ago = timezone.now() - dt.timedelta(hours=1)
    SentEmail.objects.create(key=n.key, notification=n, state="released", token=1, attempts=1)
    SentEmail.objects.filter(key=n.key).update(updated_at=long_ago)
    # The original outbox row was published and its message lost:
    n.outbox_messages.update(published_at=long_ago)

    assert recover_stalled() == [n.key]
    assert recover_stalled() == []  # touched: not requeued twice
    workers.start()
    sent = _sent(n.key)
    assert sent.attempts == 2 and smtp_server.count(n.key) == 1


def test_crash_before_send_gives_one_email_after_takeover(smtp_server, workers):
    """Dying after the claim, before the SMTP transaction ends (here: before it starts):
    the server has nothing, the takeover cannot know that, and sends once."""
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    first = workers.start(concurrency=1, NOTIFICATIONS_CRASH_POINTS=f"before_send={key}")
    notify(**kwargs)
    wait_for(lambda: SentEmail.objects.filter(key=key, send_started_at__isnull=False).exists(), timeout=20)
    wait_for(lambda: "SIGKILL" in first.output() or "Process 'ForkPoolWorker" in first.output(), timeout=20)
    first.kill()
    workers.start()
    sent = _sent(key)
    assert smtp_server.count(key) == 1
    assert sent.ambiguous_count == 1 and SentEmail.objects.get(key=key).token == 2
