"""cancel(key): stops a notification that has not been sent and says whether it was in
time; a cancel racing a worker has one outcome, decided on the claim row."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from notifications import Cancellation, cancel, notify, relay
from notifications.managers import Start
from notifications.models import Notification, OutboxMessage, SentEmail, message_id_for
from tests.conftest import notification_kwargs, wait_for
from tests.smtp import Plan

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_wakeups(settings: Any) -> None:
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


def test_a_scheduled_notification_cancelled_in_time_is_never_sent(smtp_server, workers, no_wakeups):
    n = notify(**notification_kwargs(), send_at=timezone.now() + timedelta(seconds=1))
    result = cancel(n.key)
    assert result == Cancellation(n.key, cancelled=True, in_time=True, status="cancelled") and result
    assert not OutboxMessage.objects.filter(notification=n, published_at__isnull=True).exists()
    n.refresh_from_db()
    assert n.status == "cancelled" and SentEmail.objects.get(key=n.key).state == "cancelled"
    assert cancel(n.key)  # a second cancel: still cancelled, nothing to undo


def test_a_message_already_in_the_queue_finds_the_cancel_and_sends_nothing(smtp_server, workers, no_wakeups):
    n = notify(**notification_kwargs())
    other = notify(**notification_kwargs())
    relay.drain()  # both published: the worker will see them
    assert cancel(n.key).in_time
    workers.start(concurrency=1)
    smtp_server.wait_received(other.key)  # the same message's other notification goes out
    wait_for(lambda: Notification.objects.filter(key=other.key, status="sent").exists())
    assert smtp_server.count(n.key) == 0
    assert Notification.objects.get(key=n.key).status == "cancelled"


def test_a_cancel_after_the_send_is_too_late(smtp_server, workers):
    workers.start(concurrency=1)
    n = notify(**notification_kwargs())
    smtp_server.wait_received(n.key)
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").exists())
    result = cancel(n.key)
    assert not result and result.status == "sent" and not result.cancelled
    assert Notification.objects.get(key=n.key).status == "sent"


def test_a_cancel_during_the_hand_over_is_too_late_and_the_email_arrives_once(smtp_server, workers):
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    hold = threading.Event()
    smtp_server.plan(key, Plan(hold=hold))  # the server has the message and has not answered
    workers.start(concurrency=1)
    notify(**kwargs)
    smtp_server.wait_started(key)
    result = cancel(key)
    hold.set()
    assert not result and not result.cancelled and result.status == "sending"
    wait_for(lambda: Notification.objects.filter(key=key, status="sent").exists(), timeout=30)
    assert smtp_server.count(key) == 1


def test_a_cancel_between_claim_and_send_wins_and_the_holder_sends_nothing(no_wakeups):
    """The holder has claimed the key but not yet stamped its send: the cancel takes the
    claim under a new token, so the holder's stamp (the step before every SMTP
    transaction) fails."""
    n = notify(**notification_kwargs())
    [claim] = SentEmail.objects.claim_many([(n.key, n.pk)], "holder", 15.0, "default").values()
    assert claim.outcome == "claimed"
    assert cancel(n.key).in_time
    written, started = SentEmail.objects.settle([], Start(n.key, claim.token, 15.0, message_id_for(n.key)), "default")
    assert not started
    assert SentEmail.objects.get(key=n.key).state == "cancelled"


def test_a_released_retry_cancelled_is_never_sent(smtp_server, workers, no_wakeups):
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="451 4.3.0 try again later"))
    n = notify(**kwargs)
    relay.drain()
    workers.start(concurrency=1)
    wait_for(lambda: OutboxMessage.objects.filter(notification=n, published_at__isnull=True).exists(), timeout=30)
    result = cancel(key)
    assert result.in_time  # the failed attempt was refused by the server: nothing reached anyone
    relay.drain()
    assert not OutboxMessage.objects.filter(notification=n, published_at__isnull=True).exists()
    assert Notification.objects.get(pk=n.pk).status == "cancelled"
    assert smtp_server.count(key) == 0


def test_a_cancel_in_a_transaction_that_rolls_back_cancels_nothing(no_wakeups):
    n = notify(**notification_kwargs())
    with pytest.raises(RuntimeError), transaction.atomic():
        assert cancel(n.key).in_time
        raise RuntimeError("the caller changed its mind")
    n.refresh_from_db()
    assert n.status == "created" and not SentEmail.objects.filter(key=n.key).exists()
    assert OutboxMessage.objects.filter(notification=n, published_at__isnull=True).exists()


def test_cancelling_an_unknown_key_says_so_and_writes_nothing():
    result = cancel("tests:nothing:1")
    assert result == Cancellation("tests:nothing:1", False, False, "unknown")
    assert not SentEmail.objects.exists()
    from notifications import InvalidNotification

    with pytest.raises(InvalidNotification) as caught:
        cancel("")  # type: ignore[arg-type]
    assert caught.value.field == "key"


def test_racing_cancels_and_a_worker_never_send_a_cancelled_email(smtp_server, workers, no_wakeups):
    """Many notifications, each cancelled at a random moment while a worker sends them:
    every cancel that said "in time" has no email; every other one has exactly one."""
    import random

    workers.start(concurrency=2)
    keys = [notify(**notification_kwargs()).key for _ in range(60)]
    relay.drain()
    results: dict[str, Cancellation] = {}
    for key in random.sample(keys, 30):
        results[key] = cancel(key)
    for key in keys:
        wait_for(
            lambda k=key: Notification.objects.filter(key=k, status__in=["sent", "cancelled"]).exists(), timeout=60
        )
    for key in keys:
        if key in results and results[key].in_time:
            assert smtp_server.count(key) == 0, key
            assert Notification.objects.get(key=key).status == "cancelled"
        else:
            assert smtp_server.wait_received(key, timeout=30) and smtp_server.count(key) == 1, key


def test_a_repeated_cancel_gives_the_first_answer(no_wakeups):
    """Review: a repeat of a cancel that came too late answered "in time", telling a caller
    retrying after a dropped connection that no email went out when one may have."""
    n = notify(**notification_kwargs())
    [claim] = SentEmail.objects.claim_many([(n.key, n.pk)], "holder", 0.001, "default").values()
    SentEmail.objects.settle([], Start(n.key, claim.token, 0.001, message_id_for(n.key)), "default")
    wait_for(lambda: SentEmail.objects.stuck().filter(key=n.key).exists())  # the holder died mid-send
    first = cancel(n.key)
    assert first.cancelled and not first.in_time
    again = cancel(n.key)
    assert again == first
    fresh = notify(**notification_kwargs())
    assert cancel(fresh.key).in_time and cancel(fresh.key).in_time
