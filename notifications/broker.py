"""The only code that knows the broker: the queue topology and the confirmed publish.

Deliveries go to a durable quorum queue with a delivery limit and a dead-letter
exchange, so a message that kills its worker every time ends in ``notifications.dead``
instead of looping. Every publish waits for the broker's confirm and is ``mandatory``,
so an unroutable message raises instead of vanishing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu import Exchange, Queue

from . import metrics
from .conf import settings

if TYPE_CHECKING:
    from celery import Celery

DELIVER_TASK = "notifications.deliver"  # one notification per message (earlier releases)
DELIVER_MANY_TASK = "notifications.deliver_many"
RELAY_TASK = "notifications.relay"
PURGE_TASK = "notifications.purge"
RECOVER_TASK = "notifications.recover"
DEAD_LETTERS_TASK = "notifications.dead_letters"
CONFIRM_TIMEOUT = 10.0
CELERY_CONSUMER = "celery.worker.consumer:Consumer"

logger = logging.getLogger(__name__)


def dead_letter_queue() -> Queue:
    """Where poison messages end. Declared by the publisher, never consumed by workers:
    it is for people to inspect (and to re-publish by hand)."""
    dead = Exchange(settings.DEAD_LETTER_EXCHANGE, type="topic", durable=True)
    return Queue(
        settings.DEAD_LETTER_QUEUE,
        dead,
        routing_key="#",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def _delivery_queue(name: str, exchange: Exchange) -> Queue:
    return Queue(
        name,
        exchange,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": int(settings.DELIVERY_LIMIT),
            "x-dead-letter-exchange": settings.DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": settings.DEAD_LETTER_QUEUE,
        },
    )


def delivery_queue_names() -> list[str]:
    """The delivery queues, high priority first."""
    return [settings.HIGH_QUEUE, settings.DELIVER_QUEUE]


def queues() -> list[Queue]:
    """The queues workers consume: deliveries (high priority and normal) and relay
    wake-ups. High-priority notifications travel in a queue of their own, in small
    messages: RabbitMQ's quorum queues (before 4.0) have no message priorities, and a
    worker's prefetch is per consumer, so a high one never waits behind the normal
    messages a worker has already taken."""
    exchange = Exchange(settings.EXCHANGE, type="topic", durable=True)
    return [
        _delivery_queue(settings.HIGH_QUEUE, exchange),
        _delivery_queue(settings.DELIVER_QUEUE, exchange),
        Queue(
            settings.RELAY_QUEUE,
            exchange,
            routing_key=settings.RELAY_QUEUE,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        ),
    ]


def configure(app: Celery, *, maintenance: bool = True) -> None:
    """Give a Celery app the pipeline's queues, routes and relay schedule.

    Call it in your ``celery.py`` after ``config_from_object``. Queue names and the
    delivery limit come from ``NOTIFICATIONS_*`` settings, read when Celery loads its
    configuration (not at import: ``celery.py`` is imported while Django settings load).
    ``maintenance=False`` leaves out the passes that belong to the notification service
    (recovery of stalled retries, dead letters, purge): a calling service only relays.

    It adds the pipeline's queues to ``task_queues``, routes the pipeline's tasks (the
    ``notifications.*`` names) to them through ``task_routes`` and adds beat entries;
    the app's default queue, exchange and routing key stay as they were, so the app's
    own tasks go where they went before. An app that named no ``task_queues`` keeps its
    default queue among them, so a worker started without ``-Q`` still consumes it.

    Workers get ``notifications.consumer.Consumer`` unless the app names a consumer of
    its own: it keeps a node that is down from stalling them when ``broker_url`` lists
    a cluster's nodes.
    """
    if getattr(app, "configured", False):
        _apply(app, maintenance)
    else:
        app.on_after_configure.connect(lambda sender, **kwargs: _apply(sender, maintenance), weak=False)
    from celery.signals import beat_init

    from . import exposition

    beat_init.connect(_start_relay_loop, weak=False, dispatch_uid="notifications.relay.loop")
    from . import streams

    streams.connect_signals()  # with NOTIFICATIONS_BROKER=kafka, workers consume the topics
    exposition.connect_signals()  # a worker's or beat's metrics server (NOTIFICATIONS_METRICS_PORT)


def _start_relay_loop(sender: Any = None, **kwargs: Any) -> None:
    if settings.RELAY_IN_BEAT:
        from . import relay

        relay.start_loop()


class DeadLetterUndecodable(bootsteps.StartStopStep):
    """A worker consumer step: a message the worker cannot decode is rejected, so the
    delivery queue dead-letters it (and beat's dead-letter pass settles it), instead of
    Celery's default of acking it, which drops every notification it carries."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)

        def on_decode_error(message: Any, exc: Exception) -> None:
            logger.error(
                "undecodable message (%s: %s), content type %r: rejected to the dead-letter queue",
                type(exc).__name__,
                exc,
                message.content_type,
            )
            message.reject(requeue=False)
            metrics.UNDECODABLE.inc()

        # Read by the consumer's Tasks step when it starts consuming, after every step
        # has been built.
        parent.on_decode_error = on_decode_error


def routes() -> dict[str, dict[str, str]]:
    """The pipeline's tasks by name, and the queue each one goes to."""
    deliver = {"queue": settings.DELIVER_QUEUE, "routing_key": settings.DELIVER_QUEUE}
    relay = {"queue": settings.RELAY_QUEUE, "routing_key": settings.RELAY_QUEUE}
    return {
        DELIVER_TASK: deliver,
        DELIVER_MANY_TASK: deliver,
        RELAY_TASK: relay,
        PURGE_TASK: relay,
        RECOVER_TASK: relay,
        DEAD_LETTERS_TASK: relay,
    }


def _apply(app: Celery, maintenance: bool) -> None:
    own_routes = app.conf.task_routes
    task_routes: Any
    if own_routes is None or isinstance(own_routes, dict):
        task_routes = {**(own_routes or {}), **routes()}
    else:  # a router, or a list of them: ours are asked first
        own = list(own_routes) if isinstance(own_routes, list | tuple) else [own_routes]
        task_routes = [routes(), *own]
    interval = float(settings.RELAY_INTERVAL)
    schedule = dict(app.conf.beat_schedule or {})
    # The safety net: on-commit wake-ups make delivery fast, this pass makes it certain.
    schedule.setdefault(
        "notifications-relay",
        {"task": RELAY_TASK, "schedule": interval, "options": {"expires": max(5 * interval, 5.0)}},
    )
    if maintenance:
        schedule.setdefault(
            "notifications-recover",
            {"task": RECOVER_TASK, "schedule": float(settings.RECOVER_INTERVAL), "options": {"expires": 60.0}},
        )
        schedule.setdefault(
            "notifications-dead-letters",
            {"task": DEAD_LETTERS_TASK, "schedule": 10.0, "options": {"expires": 10.0}},
        )
        schedule.setdefault(
            "notifications-purge", {"task": PURGE_TASK, "schedule": 3600.0, "options": {"expires": 600.0}}
        )
    if DeadLetterUndecodable not in app.steps["consumer"]:
        app.steps["consumer"].add(DeadLetterUndecodable)
    from .healthcheck import AliveFile  # the worker's health check (NOTIFICATIONS_WORKER_ALIVE_FILE)

    if AliveFile not in app.steps["consumer"]:
        app.steps["consumer"].add(AliveFile)
    # Without task_queues, Celery declares and consumes the app's default queue; once
    # they are set it consumes only those, so the default queue joins them (built by
    # Celery from the app's own task_default_* settings).
    own_queues = list(app.conf.task_queues or app.amqp.Queues([]).values())
    existing = [q for q in own_queues if q.name not in _names()]
    consumer = app.conf.worker_consumer
    if consumer == CELERY_CONSUMER:  # a service with a consumer of its own keeps it
        consumer = "notifications.consumer:Consumer"
    app.conf.update(
        worker_consumer=consumer,
        task_queues=[*existing, *queues()],
        task_routes=task_routes,
        beat_schedule=schedule,
    )


def _names() -> set[str]:
    return {settings.DELIVER_QUEUE, settings.HIGH_QUEUE, settings.RELAY_QUEUE, settings.DEAD_LETTER_QUEUE}


@dataclass(frozen=True)
class Refused:
    """A notification the broker cannot carry (too large, or refused by the broker)."""

    key: str
    reason: str


def _json_size(payload: dict[str, Any]) -> int:
    """Bytes of ``payload`` in the message body, as kombu's JSON writes it (ASCII, every
    other character escaped); an upper bound first, the exact size only when it matters."""
    return len(json.dumps(payload, ensure_ascii=True, separators=(", ", ": ")))


def _bound(payload: dict[str, Any]) -> int:
    # A character takes at most 12 bytes escaped (an astral one: two \uXXXX escapes).
    return 64 + sum(12 * len(v) + 16 if isinstance(v, str) else 32 for v in payload.values())


def pack(
    payloads: Sequence[dict[str, Any]], per_message: int, max_bytes: int
) -> tuple[list[list[dict[str, Any]]], list[Refused]]:
    """Group ``payloads`` into messages of at most ``per_message`` notifications and
    ``max_bytes`` bytes of JSON each, in order; a notification that alone is larger
    than ``max_bytes`` is refused."""
    room = max_bytes - MESSAGE_OVERHEAD
    batches: list[list[dict[str, Any]]] = []
    refused: list[Refused] = []
    current: list[dict[str, Any]] = []
    used = 0
    for payload in payloads:
        size = _bound(payload)
        if size * per_message > room:  # might matter: measure it
            size = _json_size(payload) + 2
        if size > room:
            refused.append(
                Refused(
                    str(payload["key"]),
                    f"the notification is {size} bytes as JSON, more than a broker message may carry "
                    f"(NOTIFICATIONS_MAX_MESSAGE_BYTES={max_bytes})",
                )
            )
            continue
        if current and (len(current) >= per_message or used + size > room):
            batches.append(current)
            current, used = [], 0
        current.append(payload)
        used += size
    if current:
        batches.append(current)
    return batches, refused


# The task message around the notifications: [[...], {}, {"callbacks": ...}] and headers.
MESSAGE_OVERHEAD = 4096


Batch = tuple[Queue, list[dict[str, Any]]]  # a delivery message: its queue and its notifications


def _grouped(payloads: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``payloads`` by the queue their priority goes to (high first) and, within it, by
    backend, in order: a message goes through one backend, so that its lanes keep to
    that backend's connection limit."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for payload in payloads:
        queue = settings.HIGH_QUEUE if payload.get("priority") == "high" else settings.DELIVER_QUEUE
        groups.setdefault((queue, str(payload.get("backend") or "")), []).append(payload)
    order = delivery_queue_names()
    return [(q, group) for (q, _), group in sorted(groups.items(), key=lambda item: order.index(item[0][0]))]


def publish_deliveries(
    app: Celery, payloads: Sequence[dict[str, Any]], per_message: int | None = None
) -> list[Refused]:
    """Publish ``deliver_many`` messages carrying ``payloads`` (``per_message`` each,
    default ``NOTIFICATIONS_DELIVERY_BATCH_SIZE``, or ``NOTIFICATIONS_HIGH_BATCH_SIZE`` for
    high-priority ones, which go to their own queue; no more than
    ``NOTIFICATIONS_MAX_MESSAGE_BYTES`` each); return only after the broker confirmed
    every one of them, with the notifications it cannot carry (the caller ends those
    failed, so that they never hold back the rows behind them). Raises on any other
    failure (unroutable, nack, timeout, connection lost), and the caller leaves the rows
    unpublished.

    The messages go out on one channel in confirm mode before waiting: one confirm
    round trip per call instead of one per message. A message the broker refuses (its
    size limit is below ours, say) closes that channel without saying which message it
    was, so then each message goes again on a channel of its own, and a refused batch
    notification by notification.
    """
    if not payloads:
        return []
    from . import kafka

    if kafka.enabled():
        return kafka.publish_deliveries(payloads, per_message)
    by_name = {q.name: q for q in queues()}
    batches: list[Batch] = []
    refused: list[Refused] = []
    for name, group in _grouped(payloads):
        default = int(settings.HIGH_BATCH_SIZE if name == settings.HIGH_QUEUE else settings.DELIVERY_BATCH_SIZE)
        size = max(1, min(per_message or default, default))
        packed, too_large = pack(group, size, int(settings.MAX_MESSAGE_BYTES))
        batches += [(by_name[name], batch) for batch in packed]
        refused += too_large
    if not batches:
        return refused
    from amqp.exceptions import PreconditionFailed

    # Declared on first use per connection (kombu caches it): both delivery queues and the dead letters.
    declare = [by_name[name] for name in delivery_queue_names()] + [dead_letter_queue()]
    with app.pool.acquire(block=True) as pooled:
        conn: Any = pooled  # a kombu Connection (the stubs say otherwise)
        conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
        try:
            try:
                try:
                    _publish_on_new_channel(app, conn, declare, batches, _confirm_timeout(batches))
                except conn.connection_errors:
                    # A pooled connection the broker (or the network) closed while it sat
                    # idle: once more on a new one. What went out unconfirmed goes again,
                    # which the claims make harmless.
                    conn.collect()
                    conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
                    _publish_on_new_channel(app, conn, declare, batches, _confirm_timeout(batches))
            except PreconditionFailed as exc:
                if not _too_large(exc):  # a queue declared otherwise, say: the rows wait
                    raise
                for batch in batches:
                    refused += _publish_alone(app, conn, declare, batch)
        except Exception:
            # A connection with a failed publish may hold late frames: drop it.
            conn.collect()
            raise
    return refused


def _publish_alone(app: Celery, conn: Any, declare: list[Queue], batch: Batch) -> list[Refused]:
    from amqp.exceptions import PreconditionFailed

    try:
        _publish_on_new_channel(app, conn, declare, [batch], _confirm_timeout([batch]))
        return []
    except PreconditionFailed as exc:
        if not _too_large(exc):
            raise
        queue, payloads = batch
        if len(payloads) == 1:
            return [Refused(str(payloads[0]["key"]), f"the broker refused the message: {exc}")]
    refused: list[Refused] = []
    for payload in payloads:
        refused += _publish_alone(app, conn, declare, (queue, [payload]))
    return refused


def _too_large(exc: Exception) -> bool:
    """Whether the broker refused a publish for its size (RabbitMQ's max_message_size),
    as opposed to any other precondition (a queue declared with other arguments)."""
    text = str(exc)
    return "message size" in text and "max size" in text


def _confirm_timeout(batches: list[Batch]) -> float:
    """Seconds to wait for the confirms of ``batches``: ``CONFIRM_TIMEOUT``, and a second
    more per MiB, so that a pass of large notifications is not timed out (and published
    again, and again) by a broker that is merely slower than that."""
    size = sum(_bound(p) for _, batch in batches for p in batch)
    return CONFIRM_TIMEOUT + size / (1024 * 1024)


def _publish_on_new_channel(
    app: Celery, conn: Any, declare: list[Queue], batches: list[Batch], timeout: float = CONFIRM_TIMEOUT
) -> None:
    channel = conn.channel()
    _publish_confirmed(app, conn, channel, declare, batches, timeout)
    channel.close()


def _publish_confirmed(
    app: Celery, conn: Any, channel: Any, declare: list[Queue], batches: list[Batch], timeout: float = CONFIRM_TIMEOUT
) -> None:
    from amqp.exceptions import MessageNacked
    from kombu import Producer

    pending: set[int] = set()
    nacked: list[int] = []

    def on_ack(tag: int, multiple: bool) -> None:
        if multiple:
            pending.difference_update([t for t in pending if t <= tag])
        else:
            pending.discard(tag)

    def on_nack(tag: int, multiple: bool) -> None:
        nacked.append(tag)

    channel.confirm_select()
    # The connection's confirm_publish option makes every publish wait for its own
    # confirm; on this channel they are collected below instead.
    channel.basic_publish = channel._basic_publish
    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(on_nack)
    producer = Producer(channel)
    for tag, (queue, batch) in enumerate(batches, start=1):
        app.send_task(
            DELIVER_MANY_TASK,
            args=[batch],
            producer=producer,
            queue=queue,  # type: ignore[arg-type]  # Celery accepts a Queue too
            routing_key=queue.routing_key,
            declare=declare,
            mandatory=True,
            retry=False,
        )
        pending.add(tag)
    deadline = time.monotonic() + timeout
    # A basic.return (unroutable) arrives before its ack and raises from drain_events.
    while pending and not nacked:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} publish(es) unconfirmed after {timeout:.0f}s")
        conn.drain_events(timeout=left)
    if nacked:
        raise MessageNacked(f"the broker refused {len(nacked)} message(s)")
    metrics.MESSAGES_PUBLISHED.inc(len(batches))


def deliveries_waiting(app: Celery) -> int:
    """How many delivery messages wait in the queue with no worker on them yet (a
    passive declare: ready messages, not the ones workers hold unacked). 0 when the
    broker cannot be asked: the caller then publishes as it would anyway."""
    from . import kafka

    if kafka.enabled():
        return kafka.deliveries_waiting()
    try:
        with app.pool.acquire(block=True) as pooled:
            conn: Any = pooled
            try:
                conn.ensure_connection(max_retries=1)  # broker away: no hold, and the pass says so
                channel = conn.default_channel
                return sum(
                    int(channel.queue_declare(queue=name, passive=True).message_count)
                    for name in delivery_queue_names()
                )
            except Exception:
                conn.collect()  # a failed passive declare closes the channel
                raise
    except Exception:
        return 0


def wake(app: Celery, countdown: float = 0.0) -> None:
    """Ask a worker to run a relay pass now, or in ``countdown`` seconds (a hint: beat
    runs one anyway). One quick retry, so that a pooled connection the broker closed is
    replaced, not given up on."""
    app.send_task(
        RELAY_TASK,
        queue=settings.RELAY_QUEUE,
        routing_key=settings.RELAY_QUEUE,
        # Native delayed delivery counts whole seconds, from 1.
        countdown=max(1, math.ceil(countdown)) if countdown > 0 else None,
        expires=30 + countdown,
        retry=True,
        retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        ignore_result=True,
    )
