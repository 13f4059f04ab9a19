"""Dead letters: a delivery message that hit the queue's delivery limit (it crashed its
worker every time) ends here, and its notification ends ``failed`` with the reason, so a
poison message is visible in the admin (and retryable) instead of silently parked. A
batch that ends here is split, so only the notification that crashes ends failed."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from .conf import settings

logger = logging.getLogger(__name__)


def _delivery_count(headers: dict[str, Any]) -> int:
    for death in headers.get("x-death") or []:
        if isinstance(death, dict) and death.get("count"):
            return int(death["count"])
    return int(headers.get("x-delivery-count") or 0)


def settle(limit: int = 100) -> list[str]:
    """Take up to ``limit`` messages off the dead-letter queue and mark their notifications
    failed (never one already sent); return their keys. Each message is acked only after
    its notification's status is committed."""
    from celery import current_app

    from . import broker
    from .models import Notification, SentEmail, Status

    db = settings.DATABASE
    keys: list[str] = []
    with current_app.connection_for_write() as conn:
        queue = broker.dead_letter_queue().bind(conn.default_channel)
        queue.declare()
        for _ in range(limit):
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            try:
                args = message.decode()[0]
                payloads = args[0] if isinstance(args[0], list) else [args[0]]
                key = payloads[0]["key"]
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                logger.error("dead letter without a notification payload, left in place: %r", exc)
                message.reject(requeue=True)
                break
            if len(payloads) > 1:
                # A whole batch hit the limit (its splits kept failing): give each
                # notification its own message, so only a poison one ends here again.
                broker.publish_deliveries(current_app, payloads, per_message=1)
                message.ack()
                continue
            payload = payloads[0]
            reason = (
                f"dead-lettered: delivery crashed its worker {_delivery_count(message.headers or {})} times "
                f"(NOTIFICATIONS_DELIVERY_LIMIT={settings.DELIVERY_LIMIT})"
            )
            with transaction.atomic(using=db):
                pk = Notification.objects.record(payload, db)
                if SentEmail.objects.fail_unless_live(key, pk, reason, db):
                    Notification.objects.using(db).filter(pk=pk).update(status=Status.FAILED, last_error=reason)
                    keys.append(key)
            message.ack()
    if keys:
        logger.warning("%d dead-lettered notification(s) marked failed, e.g. %s", len(keys), keys[0])
    return keys
