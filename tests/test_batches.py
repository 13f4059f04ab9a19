"""Many notifications per broker message: each one still has its own claim, outcome and
retry, and one bad notification never holds back the others."""

from __future__ import annotations

import pytest
from celery import current_app

from notifications import broker, notify, notify_many
from notifications.managers import NOTIFICATION_COLUMNS
from notifications.models import Notification, SentEmail
from tests.conftest import delivery_outcomes, notification_kwargs, wait_for
from tests.smtp import Plan
from tests.test_crash_points import queue_depth

pytestmark = pytest.mark.django_db(transaction=True)


def _batch(count: int) -> list[dict]:
    return [notification_kwargs(user_id=str(i)) for i in range(count)]


def _statuses(keys: list[str]) -> dict[str, str]:
    return dict(Notification.objects.filter(key__in=keys).values_list("key", "status"))


def _all_final(keys: list[str], timeout: float = 40.0) -> dict[str, str]:
    return wait_for(
        lambda: (s := _statuses(keys)) and all(v in ("sent", "failed") for v in s.values()) and s,
        timeout=timeout,
        what="every notification sent or failed",
    )


def test_one_message_carries_a_batch_over_the_workers_connections(smtp_server, workers):
    created = notify_many(_batch(20))
    keys = [n.key for n in created]
    workers.start(concurrency=1, NOTIFICATIONS_SEND_CONCURRENCY="3")
    received = [smtp_server.wait_received(key)[0] for key in keys]
    assert set(_all_final(keys).values()) == {"sent"}
    assert all(smtp_server.count(key) == 1 for key in keys)
    # Sent over the worker's three sending connections at once, one Message-ID each.
    assert len({r.peer for r in received}) == 3
    assert len({r.message_id for r in received}) == 20
    # One task result lists every notification of the message.
    from django_celery_results.models import TaskResult

    wait_for(lambda: all(delivery_outcomes(key) == ["sent"] for key in keys), what="results stored")
    assert TaskResult.objects.filter(result__contains=keys[0]).get().result.count('"sent"') == 20 + 1


def test_a_bounce_in_the_batch_fails_alone(smtp_server, workers):
    rows = _batch(10)
    bounced = f"tests:{rows[4]['notification_id']}:4"
    smtp_server.plan(bounced, Plan(reply="550 5.1.1 no such user", times=-1))
    keys = [n.key for n in notify_many(rows)]
    workers.start(concurrency=1)
    statuses = _all_final(keys)
    assert statuses.pop(bounced) == "failed"
    assert set(statuses.values()) == {"sent"}
    assert "550" in Notification.objects.get(key=bounced).last_error
    assert smtp_server.count(bounced) == 0 and all(smtp_server.count(k) == 1 for k in statuses)


def test_a_deferral_retries_that_notification_alone(smtp_server, workers):
    rows = _batch(10)
    deferred = f"tests:{rows[2]['notification_id']}:2"
    smtp_server.plan(deferred, Plan(reply="451 4.3.0 try again later", times=1))
    keys = [n.key for n in notify_many(rows)]
    workers.start(concurrency=1)
    others = [k for k in keys if k != deferred]
    # The others are sent without waiting for the deferred one's backoff.
    wait_for(lambda: set(_statuses(others).values()) == {"sent"}, timeout=30)
    sent = wait_for(lambda: Notification.objects.filter(key=deferred, status="sent").first(), timeout=30)
    assert sent.attempts == 2 and smtp_server.count(deferred) == 1
    assert all(Notification.objects.get(key=k).attempts == 1 for k in others)


def test_a_notification_that_kills_its_worker_does_not_take_its_batch_with_it(smtp_server, workers):
    """The batch's worker dies; the redelivered batch is split into single messages, the
    others are delivered once, and only the poison one reaches the dead-letter queue."""
    rows = _batch(8)
    poison_key = f"tests:{rows[3]['notification_id']}:3"
    before = queue_depth("notifications.dead")
    workers.start(concurrency=1, NOTIFICATIONS_CRASH_POINTS=f"before_claim={poison_key}")
    keys = [n.key for n in notify_many(rows)]
    others = [k for k in keys if k != poison_key]
    wait_for(lambda: set(_statuses(others).values()) == {"sent"}, timeout=60, what="the rest of the batch sent")
    assert all(smtp_server.count(k) == 1 for k in others)
    wait_for(lambda: queue_depth("notifications.dead") > before, timeout=60, what="poison dead-lettered")
    from notifications import deadletters

    assert deadletters.settle() == [poison_key]
    assert Notification.objects.get(key=poison_key).status == "failed"
    assert smtp_server.count(poison_key) == 0


def test_a_dead_lettered_batch_is_split_back_into_its_notifications(smtp_server, workers):
    """A batch that reached the delivery limit whole is not marked failed: each of its
    notifications gets its own message again, and is delivered."""
    created = notify_many(_batch(3))
    keys = [n.key for n in created]
    payloads = [{c: getattr(n, c) for c in NOTIFICATION_COLUMNS} for n in created]
    Notification.objects.filter(key__in=keys).update(status="published")
    current_app.send_task(broker.DELIVER_MANY_TASK, args=[payloads], queue=broker.dead_letter_queue())
    wait_for(lambda: queue_depth("notifications.dead") > 0, what="the batch in the dead-letter queue")
    from notifications import deadletters

    assert deadletters.settle() == []  # nothing marked failed
    workers.start(concurrency=1, queues="notifications.deliver")
    assert set(_all_final(keys).values()) == {"sent"}
    assert all(smtp_server.count(k) == 1 for k in keys)


def test_keys_repeated_in_one_message_are_delivered_once(smtp_server, workers):
    n = notify(**notification_kwargs())
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    broker.publish_deliveries(current_app, [payload, payload, payload])
    workers.start(concurrency=1)
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").exists(), timeout=30)
    wait_for(lambda: len(delivery_outcomes(n.key)) >= 3, timeout=30)
    assert smtp_server.count(n.key) == 1
    assert SentEmail.objects.get(key=n.key).attempts == 1


def test_an_unreachable_mail_server_releases_the_rest_of_the_batch_without_an_attempt(workers):
    """Finding 8: "mail server unreachable" used to count as an attempt, so an outage of a
    few minutes failed the head of every batch for good. Nothing was handed over: no
    attempt, no ambiguity; the notifications wait (bounded by GIVE_UP_AFTER) and go out
    once the server is back."""
    from tests import smtp
    from tests.settings import _free_port

    port = _free_port()  # nothing listens here yet
    keys = [n.key for n in notify_many(_batch(6))]
    workers.start(
        concurrency=1, EMAIL_PORT=str(port), NOTIFICATIONS_MAX_ATTEMPTS="100", NOTIFICATIONS_SEND_CONCURRENCY="1"
    )
    wait_for(
        lambda: SentEmail.objects.filter(key__in=keys, state="released").count() == 6,
        timeout=30,
        what=lambda: list(SentEmail.objects.filter(key__in=keys).values_list("state", "attempts", "response")),
    )
    records = SentEmail.objects.filter(key__in=keys)
    # Each pass finds no server before stamping any send: no attempt, nothing ambiguous.
    assert set(records.values_list("attempts", "ambiguous_count")) == {(0, 0)}
    assert all("unreachable" in r for r in records.values_list("response", flat=True))
    server = smtp.start(port)
    try:
        assert set(_all_final(keys, timeout=60).values()) == {"sent"}
        assert all(server.count(k) == 1 for k in keys)
        assert set(Notification.objects.filter(key__in=keys).values_list("attempts", "ambiguous_count")) == {(1, 0)}
    finally:
        server.controller.stop()


def test_the_relay_loop_in_beat_is_woken_through_redis(smtp_server, workers):
    """With beat's relay loop alive, a commit wakes it through Redis: no relay task is
    published, and the notification is delivered at once (not at the next beat pass)."""
    import time

    from notifications import relay

    loop = relay.start_loop()
    try:
        wait_for(relay.loop_alive, what="the loop's heartbeat")
        workers.start(concurrency=1, queues="notifications.deliver")
        before = queue_depth("notifications.relay")
        began = time.monotonic()
        n = notify(**notification_kwargs())
        smtp_server.wait_received(n.key)
        assert time.monotonic() - began < 5
        assert queue_depth("notifications.relay") == before  # woken through Redis, not the broker
    finally:
        loop.stop.set()  # type: ignore[attr-defined]
        loop.join(timeout=10)
    assert not loop.is_alive()
