"""Messages the worker cannot decode or run end visible, never dropped; the dead-letter
pass settles every message it finds, whatever is in front of it; and a broker that will
not take a retry does not dead-letter a good notification."""

from __future__ import annotations

import json
import subprocess

import pytest
from celery import current_app
from kombu import Exchange, Producer, Queue

from notifications import broker, deadletters, notify
from notifications.conf import settings as conf
from notifications.managers import NOTIFICATION_COLUMNS, decode_metadata
from notifications.models import Notification, SentEmail
from tests.conftest import free_port, notification_kwargs, wait_for
from tests.settings import VHOST
from tests.smtp import Plan
from tests.test_crash_points import queue_depth
from tests.test_relay import take_deliveries

pytestmark = pytest.mark.django_db(transaction=True)

TYPED = {"__type__": "x", "__value__": 1}  # what kombu's decoder takes for a typed value
NESTED = {"order": 17, "when": {"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}, "x": [TYPED]}


def _status(key: str, status: str, timeout: float = 40.0) -> Notification:
    return wait_for(
        lambda: Notification.objects.filter(key=key, status=status).first(),
        timeout=timeout,
        what=lambda: list(Notification.objects.filter(key=key).values_list("status", "last_error")),
    )


def test_metadata_that_looks_like_a_kombu_type_travels_intact(settings):
    """Finding 1: such metadata made kombu's decoder fail the whole message (or change the
    value). It travels as JSON text now: what comes off the queue is what was given."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    with current_app.connection_for_write() as conn:
        for queue in broker.queues():
            queue(conn.default_channel).declare()
    take_deliveries()  # what earlier tests left
    for metadata in (TYPED, NESTED):
        n = notify(**notification_kwargs(metadata=metadata))
        from notifications.relay import relay_batch

        relay_batch()
        with current_app.connection_for_read() as conn:
            queue = conn.SimpleQueue("notifications.deliver", no_ack=False, queue_opts={"no_declare": True})
            queue.queue.no_declare = True
            message = queue.get(block=True, timeout=10)
            payloads = message.decode()[0][0]  # kombu's own decoding, as the worker's
            message.ack()
            queue.close()
        [payload] = [p for p in payloads if p["key"] == n.key]
        assert decode_metadata(payload["metadata"]) == metadata


def test_typed_looking_metadata_is_delivered_by_a_worker(smtp_server, workers):
    workers.start(concurrency=1)
    n = notify(**notification_kwargs(metadata=NESTED))
    _status(n.key, "sent")
    assert smtp_server.count(n.key) == 1
    assert Notification.objects.get(key=n.key).metadata == NESTED


def _old_style_message(n: Notification) -> None:
    """A delivery message as an earlier release published it: metadata as a JSON object,
    which kombu's decoder cannot read here."""
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    payload["created_at"] = n.created_at.isoformat()
    current_app.send_task(broker.DELIVER_MANY_TASK, args=[[payload]], queue=broker.queues()[0])


def test_an_undecodable_message_is_dead_lettered_and_its_notification_delivered(smtp_server, workers):
    """Finding 1, more generally: Celery acks and drops a message it cannot decode, and
    every notification in it stayed ``published`` for ever. The worker rejects it to the
    dead-letter queue; the dead-letter pass reads it as plain JSON and sends it again in
    a form that decodes."""
    workers.start(concurrency=1)
    n = notify(**notification_kwargs(metadata=TYPED))
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").exists(), timeout=30)
    from django.db import transaction

    with transaction.atomic():
        fresh = notify(**notification_kwargs(metadata=TYPED))
        fresh.outbox_messages.all().delete()  # its only message is the old-style one below
    Notification.objects.filter(pk=fresh.pk).update(status="published")
    deadletters.settle()  # whatever earlier tests left
    _old_style_message(Notification.objects.get(pk=fresh.pk))
    wait_for(lambda: queue_depth("notifications.dead") >= 1, timeout=30, what="the message dead-lettered")
    assert Notification.objects.get(pk=fresh.pk).status == "published"
    deadletters.settle()  # beat runs this every 10 s
    _status(fresh.key, "sent")
    assert smtp_server.count(fresh.key) == 1


def _dead_letter(body: object, task: str, **headers: object) -> None:
    """Put a message into the dead-letter queue as RabbitMQ would have."""
    with current_app.connection_for_write() as conn:
        dead = broker.dead_letter_queue()
        producer = Producer(conn.default_channel)
        producer.publish(
            json.dumps(body),
            exchange=Exchange(conf.DEAD_LETTER_EXCHANGE, type="topic"),
            routing_key=conf.DEAD_LETTER_QUEUE,
            declare=[dead],
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": task, **headers},
            delivery_mode=2,
        )


def test_a_dead_letter_that_is_no_notification_is_parked_and_the_ones_behind_it_settled():
    """Finding 6: the pass requeued a message it could not parse and stopped there, so the
    poison notifications behind it were never marked failed. It is moved to
    ``notifications.parked`` with the reason, and the pass goes on."""
    deadletters.settle()
    n = notify(**notification_kwargs())
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    _dead_letter([["a caller's own task"], {}, {}], "billing.charge_card")
    _dead_letter([["not", "payloads"], {}, {}], broker.DELIVER_MANY_TASK)
    _dead_letter(
        [[[payload]], {}, {}],
        broker.DELIVER_MANY_TASK,
        **{"x-death": [{"reason": "delivery_limit", "count": 3, "queue": conf.DELIVER_QUEUE}]},
    )
    parked_before = queue_depth(conf.PARKED_QUEUE)
    assert deadletters.settle() == [n.key]
    failed = Notification.objects.get(pk=n.pk)
    assert failed.status == "failed" and "crashed its worker 3 times" in failed.last_error
    assert SentEmail.objects.get(key=n.key).state == "failed"
    assert queue_depth(conf.DEAD_LETTER_QUEUE) == 0
    assert queue_depth(conf.PARKED_QUEUE) == parked_before + 2
    with current_app.connection_for_read() as conn:
        parked = Queue(conf.PARKED_QUEUE).bind(conn.default_channel)
        reasons = []
        while (message := parked.get(no_ack=False)) is not None:
            reasons.append(message.headers["x-parked-reason"])
            message.ack()
    assert any("billing.charge_card" in r for r in reasons)


def _permissions(write: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", VHOST, "guest", ".*", write, ".*"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_a_broker_that_will_not_take_retries_does_not_dead_letter_good_notifications(smtp_server, workers):
    """Finding 7: when a retry could not be published, the message was requeued, which
    counts against the delivery limit: a brown-out of a few rounds dead-lettered good
    notifications, and the dead-letter pass failed them as "crashed its worker". Here the
    broker refuses every delayed retry (no write on Celery's delay exchange) while the
    mail server defers the email more times than the delivery limit (3 in tests): each
    retry goes through the outbox instead, and the email goes out."""
    from notifications import relay

    _permissions("^(?!celery_delayed_27$).*")
    loop = relay.start_loop()  # beat's relay loop: it publishes the retries once due
    try:
        workers.start(concurrency=1)
        kwargs = notification_kwargs()
        key = f"tests:{kwargs['notification_id']}:42"
        smtp_server.plan(key, Plan(reply="451 4.3.0 try again later", times=3))
        notify(**kwargs)
        sent = _status(key, "sent", timeout=60)
    finally:
        _permissions(".*")
        loop.stop.set()  # type: ignore[attr-defined]
        loop.join(timeout=20)
    assert sent.attempts == 4 and smtp_server.count(key) == 1
    assert queue_depth(conf.DEAD_LETTER_QUEUE) == 0


def test_a_dead_letter_that_cannot_be_settled_is_parked_and_does_not_block_the_rest():
    """Review: a dead letter whose settling raised (a key too long to store) went back to
    the head of the queue on every pass, and the ones behind it were never settled."""
    deadletters.settle()
    n = notify(**notification_kwargs())
    good = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    bad = {**good, "key": "x" * 600, "notification_id": "y" * 600}
    death = {"x-death": [{"reason": "delivery_limit", "count": 3, "queue": conf.DELIVER_QUEUE}]}
    _dead_letter([[[bad]], {}, {}], broker.DELIVER_MANY_TASK, **death)
    _dead_letter([[[good]], {}, {}], broker.DELIVER_MANY_TASK, **death)
    parked_before = queue_depth(conf.PARKED_QUEUE)
    assert deadletters.settle() == [n.key]
    assert Notification.objects.get(pk=n.pk).status == "failed"
    assert queue_depth(conf.DEAD_LETTER_QUEUE) == 0
    assert queue_depth(conf.PARKED_QUEUE) == parked_before + 1


def test_with_kafka_the_pass_leaves_the_rabbitmq_dead_letters_alone(settings, monkeypatch):
    """Kafka has no dead-letter queue for deliveries (the consumer fails a crashing
    notification itself and copies an undecodable message to the dead topic): the pass
    settles nothing and connects to no broker, not even Celery's."""
    deadletters.settle()
    n = notify(**notification_kwargs())
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    _dead_letter(
        [[[payload]], {}, {}],
        broker.DELIVER_MANY_TASK,
        **{"x-death": [{"reason": "delivery_limit", "count": 3, "queue": conf.DELIVER_QUEUE}]},
    )
    settings.NOTIFICATIONS_BROKER = "kafka"
    assert deadletters.settle() == []
    assert queue_depth(conf.DEAD_LETTER_QUEUE) == 1  # left where it was
    assert Notification.objects.get(pk=n.pk).status != "failed"
    with monkeypatch.context() as patched:
        # A broker that is away would raise (or retry for ever) if the pass connected.
        patched.setenv("CELERY_BROKER_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}//")
        assert deadletters.settle() == []
    settings.NOTIFICATIONS_BROKER = "rabbitmq"
    assert deadletters.settle() == [n.key]  # and RabbitMQ's pass still settles it
