"""Recovery: a notification whose message was lost before any worker claimed it (a
dropped undecodable message, a purged queue) is found and delivered, and a backlog in
the queue is never taken for loss."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import current_app
from django.utils import timezone

from notifications import broker, notify
from notifications.models import Notification, OutboxMessage
from notifications.relay import recover_stalled, relay_batch
from tests.conftest import notification_kwargs, wait_for
from tests.test_relay import take_deliveries

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def quiet(settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    settings.NOTIFICATIONS_RECOVER_UNCLAIMED_AFTER = 0.5
    with current_app.connection_for_write() as conn:
        for queue in broker.queues():
            queue(conn.default_channel).declare()
    take_deliveries()


def _published_long_enough(n: Notification) -> None:
    wait_for(
        lambda: Notification.objects.filter(pk=n.pk, status="published").exists() and recover_stalled() == [n.key],
        timeout=10,
        what="the lost message found",
    )


def test_a_message_lost_before_any_claim_is_recovered_and_delivered(quiet, smtp_server, workers):
    """Finding 2: recovery only looked at keys with a sent-email record, so a message
    lost before the claim (here: the queue purged) was never recovered."""
    n = notify(**notification_kwargs())
    assert relay_batch() == 1
    assert take_deliveries() == [[n.key]]  # the message is gone, nobody claimed it
    _published_long_enough(n)
    assert OutboxMessage.objects.filter(notification=n, published_at__isnull=True).count() == 1
    assert recover_stalled() == []  # requeued once, not on every pass
    workers.start(concurrency=1)
    relay_batch()
    wait_for(lambda: Notification.objects.filter(pk=n.pk, status="sent").exists(), timeout=30)
    assert smtp_server.count(n.key) == 1


def test_a_backlog_waiting_in_the_queue_is_not_taken_for_lost(quiet):
    n = notify(**notification_kwargs())
    assert relay_batch() == 1  # its message waits in the queue: no worker runs
    wait_for(lambda: Notification.objects.filter(pk=n.pk, status="published").exists())
    an_hour_ago = timezone.now() - timedelta(hours=1)
    Notification.objects.filter(pk=n.pk).update(published_at=an_hour_ago, updated_at=an_hour_ago)
    assert recover_stalled() == []  # its message still waits: not lost
    assert take_deliveries() == [[n.key]]
    assert recover_stalled() == [n.key]


def test_a_notification_gets_a_bounded_number_of_recovered_messages(quiet):
    """Review: run where no claim is ever recorded (a calling service's database keeping
    the notification service's maintenance), recovery requeued every published
    notification for ever, and once the service had purged its records, sent it again."""
    n = notify(**notification_kwargs())
    assert relay_batch() == 1 and take_deliveries() == [[n.key]]
    an_hour_ago = timezone.now() - timedelta(hours=1)
    for _ in range(3):
        Notification.objects.filter(pk=n.pk).update(published_at=an_hour_ago, updated_at=an_hour_ago)
        assert recover_stalled() == [n.key]
        assert relay_batch() == 1 and take_deliveries() == [[n.key]]
    Notification.objects.filter(pk=n.pk).update(published_at=an_hour_ago, updated_at=an_hour_ago)
    assert recover_stalled() == []
    assert Notification.objects.get(pk=n.pk).recoveries == 3
    long_ago = timezone.now() - timedelta(days=30)
    fresh = notify(**notification_kwargs())
    assert relay_batch() == 1 and take_deliveries() == [[fresh.key]]
    Notification.objects.filter(pk=fresh.pk).update(published_at=long_ago, updated_at=long_ago)
    assert recover_stalled() == []  # older than half the retention: its records may be gone
