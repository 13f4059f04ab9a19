"""The relay: move committed outbox rows onto the broker, in batches.

One pass claims unpublished rows with ``FOR UPDATE SKIP LOCKED`` (so any number of
relays run at once without publishing a row twice), publishes them with confirms, and
marks them published in the same transaction, only after the last confirm. If the
broker is down the transaction rolls back and the rows wait for the next pass.
"""

from __future__ import annotations

import logging
import time

from django.db import transaction

from .conf import settings
from .faults import crash_point

logger = logging.getLogger(__name__)

WAKE_FLAG = "relay:wake"


def relay_batch(using: str | None = None, batch_size: int | None = None) -> int:
    """Publish one batch; return how many rows were published."""
    from celery import current_app

    from . import broker
    from .models import OutboxMessage

    db = using or settings.DATABASE
    with transaction.atomic(using=db):
        pending = OutboxMessage.objects.claim_pending(batch_size or int(settings.RELAY_BATCH_SIZE), db)
        if not pending:
            return 0
        first = pending[0].payload["key"]
        crash_point("relay_after_claim", first)
        broker.publish_deliveries(current_app, [m.payload for m in pending])
        crash_point("relay_after_confirm", first)
        # Confirms are in: only now may the rows count as published. A crash before
        # this commit republishes them, and the worker's claim makes that harmless.
        OutboxMessage.objects.mark_published([m.outbox_id for m in pending], db)
    return len(pending)


def drain(using: str | None = None, budget: float = 10.0) -> int:
    """Publish batches until the outbox is empty or ``budget`` seconds have passed."""
    from . import locks

    locks.clear(WAKE_FLAG)  # cleared before reading: a commit after this wakes us again
    deadline = time.monotonic() + budget
    total = 0
    while True:
        published = relay_batch(using)
        total += published
        if published == 0 or time.monotonic() >= deadline:
            return total


def wake_relay() -> None:
    """On commit of a notify(): ask for a relay pass now rather than at the next beat.

    Coalesced through a Redis flag so a burst of commits sends one wake-up; any
    failure is only logged, since beat's periodic pass publishes the rows anyway.
    """
    from celery import current_app

    from . import broker, locks

    try:
        if locks.set_once(WAKE_FLAG, ttl=5.0):
            broker.wake(current_app)
    except Exception as exc:  # the periodic relay is the guarantee; this is a hint
        logger.warning("could not wake the relay (beat will publish): %s", exc)


def recover_stalled(using: str | None = None) -> list[str]:
    """Requeue keys whose next attempt's message was lost (see
    ``SentEmailManager.requeue_stalled``). Quiet for longer than any retry backoff plus
    three leases means no message for them is in flight."""
    from .models import SentEmail

    older_than = float(settings.RETRY_BACKOFF_MAX) + 3 * float(settings.CLAIM_LEASE)
    keys = SentEmail.objects.requeue_stalled(older_than, using or settings.DATABASE)
    if keys:
        logger.warning("requeued %d stalled notification(s), e.g. %s", len(keys), keys[0])
        wake_relay()
    return keys
