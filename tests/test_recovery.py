"""Recovery: a notification whose message was lost before any worker claimed it (a
dropped undecodable message, a purged queue) is found and delivered, and a backlog in
the queue is never taken for loss."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from notifications import notify
from notifications.models import Notification, OutboxMessage, SentEmail
from notifications.relay import recover_stalled, relay_batch
from tests.conftest import notification_kwargs, wait_for
from tests.smtp import Plan
from tests.test_kafka import on_kafka  # noqa: F401 (a fixture)
from tests.test_relay import empty_delivery_queues, take_deliveries

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def quiet(settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    settings.NOTIFICATIONS_RECOVER_UNCLAIMED_AFTER = 0.5
    empty_delivery_queues()


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


def test_a_retry_whose_message_was_lost_is_recovered_and_delivered(quiet, smtp_server, workers):
    """Kafka fault run: a retrying notification whose retry message a broker lost waited
    for the released-claim backstop (the longest backoff plus two leases plus a minute),
    because only never-claimed ones were looked for."""
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="451 4.3.0 try again later"))
    n = notify(**kwargs)
    assert relay_batch() == 1
    worker = workers.start(concurrency=1)
    wait_for(lambda: Notification.objects.filter(pk=n.pk, status="retrying").exists(), timeout=30)
    worker.stop()
    wait_for(lambda: relay_batch() == 1, timeout=10, what="the retry's row published when due")
    assert take_deliveries() == [[key]]  # the retry's message is gone
    assert SentEmail.objects.get(key=key).state == "released"
    wait_for(lambda: recover_stalled() == [key], timeout=10, what="the lost retry found")
    assert recover_stalled() == []
    workers.start(concurrency=1)
    relay_batch()
    wait_for(lambda: Notification.objects.filter(pk=n.pk, status="sent").exists(), timeout=30)
    assert smtp_server.count(key) == 1


def test_a_retry_whose_claim_moved_since_its_message_is_not_taken_for_lost(quiet):
    """The claim changed after the last message went out: a worker has that message."""
    n = notify(**notification_kwargs())
    assert relay_batch() == 1 and take_deliveries() == [[n.key]]
    an_hour_ago = timezone.now() - timedelta(hours=1)
    SentEmail.objects.create(key=n.key, notification=n, state="released", token=1)
    Notification.objects.filter(pk=n.pk).update(status="retrying", published_at=an_hour_ago, updated_at=an_hour_ago)
    OutboxMessage.objects.filter(notification=n).update(published_at=an_hour_ago)
    assert recover_stalled() == []  # released just now, after its message was published
    SentEmail.objects.filter(key=n.key).update(updated_at=an_hour_ago - timedelta(minutes=1))
    assert recover_stalled() == [n.key]


def test_a_scheduled_notification_whose_message_was_lost_is_recovered(quiet):
    """Kafka fault run: a scheduled notification kept the status ``scheduled`` once its
    message was out, so when that message was lost nothing looked for it."""
    n = notify(**notification_kwargs(send_at=timezone.now() + timedelta(seconds=1)))
    assert Notification.objects.get(pk=n.pk).status == "scheduled"
    wait_for(lambda: relay_batch() == 1, timeout=10, what="published at its time")
    assert Notification.objects.get(pk=n.pk).status == "published"
    assert take_deliveries() == [[n.key]]
    wait_for(lambda: recover_stalled() == [n.key], timeout=10, what="the lost message found")


@pytest.mark.usefixtures("on_kafka")
def test_on_kafka_a_lost_message_is_recovered_while_another_partition_has_a_backlog(
    settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka fault run: recovery of lost messages ran only while no message waited in any
    partition, so one stalled partition (a poison message, a cut-off worker) kept it off
    for every user. Review: it then read only the first page of candidates, so a stalled
    partition's older rows could hide the lost ones behind them (here a page is 1 row)."""
    from notifications import kafka, managers

    monkeypatch.setattr(managers, "KEEP_PAGE", 1)

    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    settings.NOTIFICATIONS_RECOVER_UNCLAIMED_AFTER = 0.5
    lost_user = "lost-0"
    busy_user = next(
        f"busy-{i}" for i in range(100) if kafka.partition_for(f"busy-{i}", 4) != kafka.partition_for(lost_user, 4)
    )
    backlog = []
    for _ in range(2):  # two messages waiting in the busy partition, no worker runs
        backlog.append(notify(**notification_kwargs(user_id=busy_user)))
        assert relay_batch() == 1
    assert kafka.deliveries_waiting() > 0
    an_hour_ago = timezone.now() - timedelta(hours=1)
    Notification.objects.filter(pk__in=[n.pk for n in backlog]).update(published_at=an_hour_ago, updated_at=an_hour_ago)
    OutboxMessage.objects.filter(notification__in=backlog).update(published_at=an_hour_ago)
    lost = notify(**notification_kwargs(user_id=lost_user))
    # Marked published though no message reached Kafka: a message the broker lost.
    OutboxMessage.objects.mark_published(
        list(OutboxMessage.objects.filter(notification=lost).values_list("pk", flat=True)), "default"
    )
    wait_for(lambda: recover_stalled() == [lost.key], timeout=10, what="the lost message found")
    assert relay_batch() == 1
    assert recover_stalled() == []  # the backlog's messages still wait in their partition: not lost
    assert not any(Notification.objects.get(pk=n.pk).recoveries for n in backlog)


def test_a_lost_message_is_recovered_when_its_outbox_rows_are_gone(quiet):
    """Kafka fault run: the recovery dated a message by its outbox rows only, so a
    published notification whose rows were gone (pruned by retention) was never found."""
    n = notify(**notification_kwargs())
    assert relay_batch() == 1 and take_deliveries() == [[n.key]]
    OutboxMessage.objects.filter(notification=n).delete()
    wait_for(lambda: recover_stalled() == [n.key], timeout=10, what="the lost message found")
    assert OutboxMessage.objects.filter(notification=n, published_at__isnull=True).count() == 1
