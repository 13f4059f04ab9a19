"""Celery tasks: thin shells that decode arguments and call the plain-Python core.

Names are fixed strings so that moving a module never strands messages in flight.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from celery import shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import task_prerun
from django.db import DatabaseError, InterfaceError, close_old_connections
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from . import broker, delivery, metrics, relay

logger = logging.getLogger(__name__)


def _countdown(seconds: float) -> int:
    """Celery's countdown in whole seconds, from 1 (the last resort of ``_retry``)."""
    return max(1, math.ceil(seconds))


def _retry(task: Any, seconds: float, exc: Exception | None = None, args: list[Any] | None = None) -> None:
    """Try the notifications of ``args`` (default: the task's own) again in ``seconds``.

    A retry is a due outbox row in this service's database, published by its relay once
    due (``delivery.requeue_through_outbox``), never a countdown message the broker or a
    worker holds: an operator sees every waiting email in one place, a worker restart
    loses nothing, and a broker without delayed delivery needs none. Only when the
    database cannot take the rows (the very error being retried, often) does the retry
    fall back on Celery's countdown, and if that cannot be published either, the message
    is requeued.

    Returns None (through the outbox), or raises ``Retry`` (a countdown message) or
    ``Reject(requeue=True)``.
    """
    payloads = _payloads(args if args is not None else list(task.request.args or []))
    try:
        queued = delivery.requeue_through_outbox(payloads, due_in=seconds)
    except Exception as db_exc:
        logger.warning("retry of %d notification(s) not queued in the outbox (%r)", len(payloads), db_exc)
    else:
        logger.info("%d notification(s) queued in the outbox, due in %.1fs", queued, seconds)
        return
    try:
        task.retry(args=args, countdown=_countdown(seconds), exc=exc)
    except (Reject, SoftTimeLimitExceeded) as rejected:
        reason = getattr(rejected, "reason", rejected)
        logger.warning("retry not published (%s) nor queued in the outbox; requeueing", reason)
        raise Reject(reason, requeue=True) from None


def _payloads(args: list[Any]) -> list[dict[str, Any]]:
    """The notifications of a task's arguments: ``deliver_many``'s list or ``deliver``'s one."""
    first = args[0] if args else []
    return list(first) if isinstance(first, list) else [first]


# Errors that say nothing about the emails themselves (infrastructure hiccups): retry the
# message. They happen before the SMTP transaction or are recorded after it.
INFRASTRUCTURE_ERRORS = (DatabaseError, InterfaceError, RedisError, BrokerError, SoftTimeLimitExceeded)
MAX_INFRASTRUCTURE_RETRIES = 50


def _budget(task: Any) -> float:
    """Seconds a batch may spend sending before it hands the rest to a new message:
    half the soft time limit, so a slow mail server never runs a batch into it."""
    soft = task.request.timelimit[1] if task.request.timelimit else None
    soft = soft or task.app.conf.task_soft_time_limit
    return float(soft) / 2 if soft else 60.0


def _deliver(task: Any, payloads: list[dict[str, Any]]) -> list[delivery.Outcome]:
    """Deliver a message's notifications; items to try again go out in one new message,
    after the longest backoff among them, and the rest are done."""
    try:
        outcomes = delivery.deliver_many(payloads, budget=_budget(task))
    except INFRASTRUCTURE_ERRORS as exc:
        metrics.batch_retries[_cause(exc)].inc()
        if task.request.retries >= MAX_INFRASTRUCTURE_RETRIES:
            raise
        delay = min(30.0, 0.5 * 2 ** min(task.request.retries, 6)) * random.uniform(0.5, 1.0)
        logger.warning(
            "%d notification(s), e.g. %s: %r, retrying in %.1fs", len(payloads), payloads[0].get("key"), exc, delay
        )
        _retry(task, delay, exc)
        return [delivery.Outcome(p["key"], "retry", detail=f"queued in the outbox after {exc!r}") for p in payloads]
    again = [(p, o) for p, o in zip(payloads, outcomes, strict=True) if o.status == "retry"]
    if again:
        delay = max(o.retry_in for _, o in again) + random.uniform(0, 0.5)
        args = [[p for p, _ in again]] if task.name == broker.DELIVER_MANY_TASK else [again[0][0]]
        _retry(task, delay, args=args)
    return outcomes


def _cause(exc: BaseException) -> str:
    """An infrastructure error's cause, in a word (a metrics label)."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time_limit"
    if isinstance(exc, DatabaseError | InterfaceError):
        return "database"
    if isinstance(exc, RedisError):
        return "redis"
    if isinstance(exc, BrokerError):
        return "broker"
    return "other"


def _summary(outcome: delivery.Outcome) -> dict[str, Any]:
    return {"key": outcome.key, "status": outcome.status, "detail": outcome.detail, "attempts": outcome.attempts}


@task_prerun.connect(weak=False, dispatch_uid="notifications.tasks.fresh_connections")
def _fresh_connections(sender: Any = None, **kwargs: Any) -> None:
    """Where a worker keeps its database connection across tasks (``CELERY_DB_REUSE_MAX``),
    drop it when it is broken or past ``CONN_MAX_AGE``, as Django does for each request."""
    if getattr(sender, "name", "").startswith("notifications."):
        close_old_connections()


@shared_task(name=broker.DELIVER_MANY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def deliver_many(self: Any, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Deliver a batch of notifications (each travels whole in ``payloads``).

    Acked only after every outcome is recorded; a worker that dies first leaves the
    message to be redelivered, and the claims make that redelivery safe. A redelivered
    batch is first split into one message per notification, so a notification that
    kills its worker every time reaches the delivery limit alone and the others go on.
    """
    if len(payloads) > 1 and (self.request.delivery_info or {}).get("redelivered"):
        try:
            refused = broker.publish_deliveries(self.app, payloads, per_message=1)
        except Exception as exc:
            # The broker takes no publishes now: through the outbox instead (see _retry).
            try:
                queued = delivery.requeue_through_outbox(payloads)
            except Exception:
                raise Reject(f"could not split the batch: {exc!r}", requeue=True) from None
            logger.warning("redelivered batch of %d queued in the outbox (%r)", queued, exc)
            return {"split": len(payloads), "through_outbox": queued}
        if refused:  # too large for the broker now: it cannot be delivered through it
            from . import deadletters

            by_key = {p["key"]: p for p in payloads}
            for r in refused:
                deadletters.fail(by_key[r.key], f"failed: {r.reason}", crashed=True, category="oversized")
        logger.warning("redelivered batch of %d split into single messages", len(payloads))
        metrics.BATCHES_SPLIT.inc()
        return {"split": len(payloads)}
    try:
        outcomes = _deliver(self, payloads)
    finally:
        # The task's own database connection may have died while the lanes sent (a
        # terminated session): Celery stores the result on it next, and a failure there
        # would count the task failed and dead-letter a message whose outcomes are all
        # recorded. Dropped here when unusable, it is opened anew for the result.
        close_old_connections()
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return {**counts, "outcomes": [_summary(o) for o in outcomes]}


@shared_task(name="notifications.deliver", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def deliver(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Deliver one notification: messages published by earlier releases, one per email."""
    return _summary(_deliver(self, [payload])[0])


@shared_task(name="notifications.relay", ignore_result=True)
def relay_outbox() -> int:
    """Publish committed outbox rows (beat runs this every NOTIFICATIONS_RELAY_INTERVAL
    seconds; a wake-up sends it when beat's relay loop is not running).

    While the loop shows its heartbeat, it makes these passes itself (at least once an
    interval), so the task leaves them to it: a pass over a backlog takes a pool slot
    from deliveries for seconds. If the loop hangs, its heartbeat lapses and the task
    takes over again."""
    if relay.loop_alive():
        return 0
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
def purge() -> dict[str, Any]:
    """Delete what is past retention: published outbox rows and finished sent-email
    records (``NOTIFICATIONS_SENT_RETENTION_DAYS``), then finished notifications with
    their content (``NOTIFICATIONS_RETENTION_DAYS``). Beat runs it hourly."""
    from . import retention

    return retention.purge().as_dict()
