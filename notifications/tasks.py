"""Celery tasks: thin shells that decode arguments and call the plain-Python core.

Names are fixed strings so that moving a module never strands messages in flight.
"""

from __future__ import annotations

import logging
import math
import random
from datetime import timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.db import DatabaseError, InterfaceError
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from . import delivery, relay
from .conf import settings
from .exceptions import ClaimBusy

logger = logging.getLogger(__name__)


def _countdown(seconds: float) -> int:
    """RabbitMQ native delayed delivery (quorum queues) counts whole seconds, from 1."""
    return max(1, math.ceil(seconds))


def _retry(task: Any, seconds: float, exc: Exception | None = None) -> Exception:
    """``task.retry()``, except that a retry that cannot be published (the broker is
    restarting) requeues this message instead of Celery's default of rejecting it, which
    would dead-letter a perfectly good notification."""
    try:
        return task.retry(countdown=_countdown(seconds), exc=exc)  # type: ignore[no-any-return]
    except Reject as rejected:
        reason = getattr(rejected, "reason", rejected)
        logger.warning("retry not published (%s); requeueing the message", reason)
        return Reject(reason, requeue=True)


# Errors that say nothing about the email itself (infrastructure hiccups): retry the
# message. They happen before the SMTP transaction or are recorded after it.
INFRASTRUCTURE_ERRORS = (DatabaseError, InterfaceError, RedisError, BrokerError, SoftTimeLimitExceeded)
MAX_INFRASTRUCTURE_RETRIES = 50


@shared_task(name="notifications.deliver", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def deliver(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Deliver one notification (the whole notification travels in ``payload``).

    Acked only after the outcome is recorded; a worker that dies first leaves the
    message to be redelivered, and the claim makes that redelivery safe.
    """
    try:
        outcome = delivery.deliver(payload)
    except ClaimBusy as exc:
        raise _retry(self, exc.retry_in + random.uniform(0, 0.5), exc) from None
    except INFRASTRUCTURE_ERRORS as exc:
        if self.request.retries >= MAX_INFRASTRUCTURE_RETRIES:
            raise
        delay = min(30.0, 0.5 * 2 ** min(self.request.retries, 6)) * random.uniform(0.5, 1.0)
        logger.warning("%s: %r, retrying in %.1fs", payload.get("key"), exc, delay)
        raise _retry(self, delay, exc) from None
    if outcome.status == "retry":
        raise _retry(self, outcome.retry_in)
    return {"key": outcome.key, "status": outcome.status, "detail": outcome.detail, "attempts": outcome.attempts}


@shared_task(name="notifications.relay", ignore_result=True)
def relay_outbox() -> int:
    """Publish committed outbox rows (beat runs this every NOTIFICATIONS_RELAY_INTERVAL
    seconds; notify() also wakes it on commit)."""
    return relay.drain()


@shared_task(name="notifications.recover", ignore_result=True)
def recover() -> int:
    """Requeue notifications whose retry message was lost (beat runs this every minute)."""
    return len(relay.recover_stalled())


@shared_task(name="notifications.dead_letters", ignore_result=True)
def dead_letters() -> int:
    """Mark the notifications of dead-lettered messages failed (beat runs this every 10 s)."""
    from . import deadletters

    return len(deadletters.settle())


@shared_task(name="notifications.purge", ignore_result=True)
def purge() -> dict[str, int]:
    """Delete published outbox rows and finished sent-email records past retention."""
    from django.utils import timezone

    from .models import OutboxMessage, SentEmail

    keep = timedelta(days=int(settings.SENT_RETENTION_DAYS))
    db = settings.DATABASE
    return {
        "outbox": OutboxMessage.objects.purge_published(timezone.now() - keep, db),
        "sent": SentEmail.objects.purge(keep, db),
    }
