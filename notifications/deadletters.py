"""Dead letters: what the delivery queue gave up on ends where a person sees it, never
dropped, and never in the way of what comes after it.

Two kinds of message reach ``notifications.dead``: one that hit the queue's delivery
limit (it crashed its worker every time), and one a worker refused (it could not be
decoded, or names a task the worker does not know). Beat's pass takes each off:

- a batch that hit the limit is split, so only the notification that crashes ends here
  again; one that did ends ``failed`` with the reason (or held, in hold mode, when a
  send of it had started), retryable in the admin;
- a message kombu cannot decode is read as plain JSON: its notifications are sent again
  in a form that decodes (metadata as JSON text), or end ``failed`` with the error;
- anything else (not a notification: another service's task, say) is moved to
  ``notifications.parked`` with the reason in a header, for a person.

Each message is acked only after what it leaves behind is committed or confirmed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import transaction

from . import events, metrics
from .conf import settings

logger = logging.getLogger(__name__)


def _unavailable() -> tuple[type[BaseException], ...]:
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError

    return (InterfaceError, OperationalError, BrokerError, ConnectionError, TimeoutError)


_UNAVAILABLE = _unavailable()


def _death(headers: dict[str, Any]) -> tuple[str, int]:
    """Why and after how many deliveries the queue dead-lettered a message."""
    for death in headers.get("x-death") or []:
        if isinstance(death, dict):
            reason = death.get("reason")
            reason = reason.decode() if isinstance(reason, bytes) else str(reason or "")
            return reason, int(death.get("count") or 0)
    return "", int(headers.get("x-delivery-count") or 0)


def _notifications(args: Any) -> list[dict[str, Any]] | None:
    """The notifications a task message's positional arguments carry, or None."""
    if not isinstance(args, list) or not args:
        return None
    first = args[0]
    payloads = first if isinstance(first, list) else [first]
    if payloads and all(isinstance(p, dict) and isinstance(p.get("key"), str) for p in payloads):
        return payloads
    return None


def _read(message: Any) -> tuple[list[dict[str, Any]] | None, str]:
    """(the notifications, "") or, for a message kombu cannot decode, what it can be
    read as plain JSON and the decoding error; (None, why) if it is no notification."""
    from . import broker

    task = (message.headers or {}).get("task")
    if task not in (broker.DELIVER_TASK, broker.DELIVER_MANY_TASK):
        return None, f"not a delivery message (task {task!r})"
    try:
        return _notifications(message.decode()[0]), ""
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    try:
        body = message.body
        body = body.decode("utf-8") if isinstance(body, bytes) else body
        payloads = _notifications(json.loads(body)[0])
    except Exception:
        payloads = None
    if payloads is None:
        return None, f"undecodable message ({error})"
    return payloads, error


def _decodable(payload: dict[str, Any]) -> dict[str, Any] | None:
    """``payload`` as the relay publishes it today, if kombu can decode that back."""
    from kombu.utils import json as kombu_json

    fixed = dict(payload)
    if not isinstance(fixed.get("metadata"), str):
        fixed["metadata"] = json.dumps(fixed.get("metadata") or {})
    try:
        return fixed if kombu_json.loads(kombu_json.dumps(fixed)) == fixed else None
    except Exception:
        return None


def fail(payload: dict[str, Any], reason: str, crashed: bool = False, category: str = "other") -> bool:
    """End one notification ``failed`` with ``reason`` (never one that was sent, or that a
    live worker holds); held instead, in hold mode, if a send of it had started. A claim
    released for a retry is left to that retry's message, unless ``crashed``: it was
    that message which kept crashing its worker (or cannot travel at all). True if this
    call recorded it. ``category`` is the reason in a word, for the metrics
    (``metrics.FAILURE_REASONS``)."""
    from .models import Notification, SentEmail, Status

    db = settings.DATABASE
    with transaction.atomic(using=db):
        pk = Notification.objects.record(payload, db)
        finished = SentEmail.objects.fail_unless_live(
            payload["key"], pk, reason, hold=settings.AMBIGUOUS == "hold", using=db, released=crashed
        )
        if finished is None:
            return False
        status = Status.AMBIGUOUS if finished.state == "held" else Status.FAILED
        from django.db.models import F

        Notification.objects.using(db).filter(pk=pk).update(
            status=status,
            last_error=finished.reason[:2000],
            ambiguous_count=F("ambiguous_count") + (1 if finished.ambiguous else 0),
        )
        transaction.on_commit(lambda: _failed(payload["key"], pk, finished, category), using=db, robust=True)
    return True


def _failed(key: str, pk: int, finished: Any, category: str) -> None:
    held = finished.state == "held"
    if finished.ambiguous:
        events.ambiguous(key, pk, 0, "hold" if held else "fail")
    events.delivered("held" if held else "failed", key, pk, reason=category, detail=finished.reason)


def settle(limit: int = 100) -> list[str]:
    """Take up to ``limit`` messages off the dead-letter queue and settle each as the
    module docstring says; return the keys ended failed (or held).

    With ``NOTIFICATIONS_BROKER=kafka`` there is no delivery dead-letter queue: the
    consumer ends a notification that crashed it ``failed`` itself and copies a message
    it cannot decode to ``NOTIFICATIONS_KAFKA_DEAD_TOPIC``; the pass returns [] without
    connecting to any broker."""
    if settings.BROKER == "kafka":
        return []
    from celery import current_app

    from . import broker

    keys: list[str] = []
    with current_app.connection_for_write() as conn:
        queue = broker.dead_letter_queue().bind(conn.default_channel)
        queue.declare()
        for _ in range(limit):
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            try:
                keys += _settle_one(current_app, conn, message)
            except _UNAVAILABLE:
                raise  # the database or the broker is away: the message waits for the next pass
            except Exception as exc:
                # Something in this message itself (a key too long to store, say): it
                # goes to the parked queue with the error, and the pass goes on.
                logger.exception("dead letter could not be settled")
                _park(conn, message, f"could not be settled: {type(exc).__name__}: {exc}")
            message.ack()
    if keys:
        logger.warning("%d dead-lettered notification(s) ended failed or held, e.g. %s", len(keys), keys[0])
    return keys


def _settle_one(app: Any, conn: Any, message: Any) -> list[str]:
    from . import broker

    payloads, error = _read(message)
    if payloads is None:
        _park(conn, message, error)
        return []
    reason, count = _death(message.headers or {})
    if error:  # read as plain JSON: send again what now decodes, fail the rest
        again = [fixed for p in payloads if (fixed := _decodable(p)) is not None]
        refused = broker.publish_deliveries(app, again, per_message=1) if again else []
        sent_again = {p["key"] for p in again} - {r.key for r in refused}
        why = f"dead-lettered: the worker could not decode its message ({error})"
        return [p["key"] for p in payloads if p["key"] not in sent_again and fail(p, why, category="undecodable")]
    if len(payloads) > 1:
        # A whole batch hit the limit (its splits kept failing): give each notification
        # its own message, so only a poison one ends here again.
        refused = broker.publish_deliveries(app, payloads, per_message=1)
        by_key = {p["key"]: p for p in payloads}
        return [
            r.key
            for r in refused
            if fail(by_key[r.key], f"dead-lettered: {r.reason}", crashed=True, category="oversized")
        ]
    if reason == "rejected":
        # A worker refused it after running it (Celery rejects a task that raised): its
        # claims say what happened, and a retry it released is on its way.
        why = "dead-lettered: a worker refused its message (see the worker's log)"
        return [payloads[0]["key"]] if fail(payloads[0], why, category="dead_lettered") else []
    why = (
        f"dead-lettered: delivery crashed its worker {count} times "
        f"(NOTIFICATIONS_DELIVERY_LIMIT={settings.DELIVERY_LIMIT})"
    )
    return [payloads[0]["key"]] if fail(payloads[0], why, crashed=True, category="crashed_worker") else []


def _park(conn: Any, message: Any, reason: str) -> None:
    """Move a message that carries no notification to the parked queue, as it came,
    with ``reason`` in the ``x-parked-reason`` header (confirmed before the ack)."""
    from kombu import Producer, Queue

    logger.error("dead letter without a notification, moved to %s: %s", settings.PARKED_QUEUE, reason)
    parked = Queue(settings.PARKED_QUEUE, durable=True, queue_arguments={"x-queue-type": "quorum"})
    producer = Producer(conn.default_channel)
    producer.publish(
        message.body,
        routing_key=settings.PARKED_QUEUE,
        exchange="",
        declare=[parked],
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers={**(message.headers or {}), "x-parked-reason": reason[:1000]},
        delivery_mode=2,
        retry=False,
    )
    metrics.PARKED.inc()
