"""The relay: move committed outbox rows onto the broker, in batches.

One pass claims unpublished rows with ``FOR UPDATE SKIP LOCKED`` (so any number of
relays run at once without publishing a row twice), publishes them with confirms, and
marks them published in the same transaction, only after the last confirm. If the
broker is down the transaction rolls back and the rows wait for the next pass.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
from typing import Any

from django.db import transaction

from . import events, wakeup
from .conf import settings
from .faults import crash_point

logger = logging.getLogger(__name__)

WAKE_FLAG = "relay:wake"  # set while a relay pass is due: later commits need not wake it
WAKE_LIST = "relay:wakeups"  # what the relay loop in beat blocks on
LOOP_ALIVE = "relay:loop"  # the relay loop's heartbeat


def databases() -> list[str]:
    """The database aliases whose outboxes this service's relay publishes."""
    return list(settings.RELAY_DATABASES or [settings.DATABASE])


@functools.lru_cache(maxsize=16)
def _identity(alias: str) -> str:
    """Which database an alias is, as every process of the service (and no other
    service) names it: its server and name, not the alias."""
    import hashlib

    from django.db import connections

    conf = connections.settings.get(alias, {})
    where = f"{conf.get('HOST', '')}:{conf.get('PORT', '')}/{conf.get('NAME', '')}"
    return hashlib.sha256(where.encode()).hexdigest()[:12]


def key(name: str) -> str:
    """A relay Redis key of this service: named by its relay queue and by the databases
    it relays, so that services sharing a Redis and a broker (even under the default
    queue name) never take each other's wake-ups or heartbeat."""
    dbs = ",".join(sorted(_identity(alias) for alias in databases()))
    return f"{name}:{settings.RELAY_QUEUE}:{dbs}"


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
        refused = {r.key: r.reason for r in broker.publish_deliveries(current_app, [m.payload for m in pending])}
        crash_point("relay_after_confirm", first)
        # Confirms are in: only now may the rows count as published. A crash before
        # this commit republishes them, and the worker's claim makes that harmless.
        OutboxMessage.objects.mark_published([m.outbox_id for m in pending], db)
        failed: list[tuple[str, int]] = []
        if refused:
            # What the broker cannot carry ends failed, visibly, instead of being taken
            # again by every pass in front of the rows behind it.
            logger.error("%d notification(s) the broker cannot carry, e.g. %s", len(refused), next(iter(refused)))
            failed = OutboxMessage.objects.mark_refused(
                [(m.notification_id, refused[m.payload["key"]]) for m in pending if m.payload["key"] in refused], db
            )
        transaction.on_commit(lambda: _published(pending, failed, refused), using=db, robust=True)
    return len(pending)


def _published(pending: list[Any], failed: list[tuple[str, int]], refused: dict[str, str]) -> None:
    events.published(pending)
    for key, pk in failed:
        events.delivered("failed", key, pk, reason="oversized", detail=refused.get(key))


def drain(using: str | None = None, budget: float = 10.0) -> int:
    """Publish batches while they come out full, or until ``budget`` seconds have passed.

    The wake-up flag is cleared first: every commit before the clear is in the passes
    that follow, and a commit after it raises the flag again and wakes the next round.
    Out of time with rows left, it wakes that round itself.
    """
    from . import locks

    locks.clear(key(WAKE_FLAG))
    size = int(settings.RELAY_BATCH_SIZE)
    deadline = time.monotonic() + budget
    total = 0
    failed: Exception | None = None
    with events.relay_pass() as rows:
        for db in [using] if using else databases():
            try:
                while True:
                    published = relay_batch(db, size)
                    total += published
                    rows.append(published)
                    if published < size:
                        break
                    if time.monotonic() >= deadline:
                        wake_relay()
                        return total
            except Exception as exc:  # one database away must not stop the others' relay
                logger.warning("relay pass over %s failed: %r", db, exc)
                failed = exc
        if failed is not None:
            raise failed
    return total


def wake_relay() -> None:
    """After a commit that queued notifications: ask for a relay pass now rather than at
    the next beat. ``notify()`` has it sent from a background thread (``wake_relay_soon``).

    Coalesced through a Redis flag, so a burst of commits wakes the relay once. The
    wake-up is a Redis push to the relay loop that runs in beat (``relay_forever``); if
    no loop has shown a heartbeat lately, a relay task goes to the workers instead. Any
    failure is only logged: beat's periodic pass publishes the rows anyway.
    """
    from celery import current_app

    from . import broker, locks

    try:
        newly, loop_alive = locks.raise_flag(key(WAKE_FLAG), ttl=5.0, listener=key(LOOP_ALIVE))
        if newly and not (loop_alive and _reach_loop()):
            broker.wake(current_app)
    except Exception as exc:  # the periodic relay is the guarantee; this is a hint
        logger.warning("could not wake the relay (beat will publish): %s", exc)


def _reach_loop() -> bool:
    """Wake the live relay loop the way it waits (``NOTIFICATIONS_RELAY_WAKEUP``); False
    if that failed (a worker's relay task is sent instead)."""
    from . import locks

    how = wakeup.mode()
    if how == "poll":
        return True  # it looks within a poll interval anyway
    if how == "listen":
        try:
            wakeup.notify(databases()[0])
            return True
        except Exception as exc:
            logger.warning("could not NOTIFY the relay loop: %r", exc)
            return False
    return locks.push(key(WAKE_LIST))


def wake_relay_in(seconds: float) -> None:
    """After a commit that queued rows due in ``seconds`` (a retry's backoff): when no
    relay loop runs (it would wake for them itself, see ``_until_next_due``), ask a
    worker for a relay pass at that time. Only a hint, carrying no notification: beat's
    periodic pass publishes the rows whatever becomes of it."""
    from celery import current_app

    from . import broker

    if seconds <= 0:
        wake_relay()
        return
    try:
        if not loop_alive():
            broker.wake(current_app, countdown=seconds)
    except Exception as exc:
        logger.warning("could not ask for a relay pass in %.1fs (beat will publish): %s", seconds, exc)


WAKE_GAP = 0.005  # seconds between two wake-ups from one process


class _Waker:
    """Sends ``wake_relay()`` from a background thread, so a commit does not wait on
    Redis. Requests that arrive while a wake-up is on its way, or within ``WAKE_GAP``
    after it, fold into one more, so a burst of commits costs a few round trips, not
    one each. Kept with the pid: a forked child starts its own thread."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also in a forked child: the parent's thread is not there, and the parent may
        # have held the lock at the moment of the fork.
        self.pid = 0
        self.cond = threading.Condition()
        self.asked = self.sent = 0

    def request(self) -> None:
        with self.cond:
            if self.pid != os.getpid():
                self.pid, self.asked, self.sent = os.getpid(), 0, 0
                threading.Thread(target=self._run, name="notifications-wake", daemon=True).start()
            self.asked += 1
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.asked != self.sent)
                target = self.asked
            try:
                wake_relay()
            except Exception:  # never let the thread die: later commits still need it
                logger.exception("wake-up failed (beat will publish)")
            with self.cond:
                self.sent = target
                self.cond.notify_all()
            # Commits in the next few ms fold into one wake-up: the relay lingers longer
            # than that anyway, and a round trip per commit cost the caller more CPU
            # than its insert.
            time.sleep(WAKE_GAP)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until the wake-ups asked for so far are sent (at exit, and in tests)."""
        with self.cond:
            return self.pid != os.getpid() or self.cond.wait_for(lambda: self.sent == self.asked, timeout)


_waker = _Waker()
atexit.register(_waker.flush)
os.register_at_fork(after_in_child=_waker._reset)


def wake_relay_soon() -> None:
    """``wake_relay()`` without waiting for it: what a commit of ``notify()`` calls."""
    _waker.request()


def loop_alive() -> bool:
    """Whether beat's relay loop has shown its heartbeat lately (False when Redis
    cannot say: then every relay pass runs, as without the loop)."""
    from . import locks

    return locks.exists(key(LOOP_ALIVE))


def relay_forever(stop: threading.Event, using: str | None = None) -> None:
    """The relay loop beat runs beside its schedule: wait for a wake-up (or
    ``NOTIFICATIONS_RELAY_INTERVAL``), linger ``NOTIFICATIONS_RELAY_LINGER`` so that a
    burst of commits goes out in fuller messages (longer while the workers are behind,
    see ``_hold_while_behind``), and ``drain()``. It costs a commit one
    Redis round trip instead of a broker publish, and it never takes a worker's pool
    slot."""
    import django
    from django.apps import apps

    from . import locks

    if not apps.ready:  # beat may start before Django's app registry is loaded
        django.setup()
    interval = float(settings.RELAY_INTERVAL)
    linger = float(settings.RELAY_LINGER)
    alive_for = max(5.0, 3 * interval)
    how = wakeup.mode()
    listener = wakeup.Listener([using] if using else databases()) if how == "listen" else None
    if listener is not None:
        listener.wait(0)  # LISTEN before the first pass: no commit falls between the two
    try:
        _loop(stop, using, interval, linger, alive_for, how, listener)
    finally:
        if listener is not None:
            listener.close()
    locks.clear(key(LOOP_ALIVE))  # stopped: wake-ups and beat's relay task take over at once


def _loop(
    stop: threading.Event,
    using: str | None,
    interval: float,
    linger: float,
    alive_for: float,
    how: str,
    listener: wakeup.Listener | None,
) -> None:
    from django.db import close_old_connections, connections

    from . import locks

    published = 0
    while not stop.is_set():
        healthy = False  # this pass published (or found nothing to publish)
        try:
            published = drain(using, budget=alive_for / 2)
        except Exception as exc:  # broker or database away: the next round tries again
            # No heartbeat for a failed pass: if this loop cannot publish (its database
            # or broker connection is broken, say) while others could, the workers'
            # relay task takes over once the heartbeat lapses.
            logger.warning("relay pass failed, retrying: %r", exc)
            close_old_connections()
            for db in [using] if using else databases():
                connections[db].close()
            stop.wait(min(interval, 1.0))
        else:
            healthy = True
            locks.heartbeat(key(LOOP_ALIVE), alive_for)
        timeout = _until_next_due(using, interval) if healthy else interval
        if how == "poll":
            # No wake-ups: the next look in a poll interval; while rows keep coming, the
            # queue's backlog holds them as it would after a wake-up.
            stop.wait(min(timeout, float(settings.RELAY_POLL)))
            if published and linger > 0:
                _hold_while_behind(stop, linger, alive_for if healthy else 0.0)
            continue
        woken = listener.wait(timeout) if listener is not None else locks.wait(key(WAKE_LIST), timeout)
        if woken and linger > 0:
            stop.wait(linger)
            _hold_while_behind(stop, linger, alive_for if healthy else 0.0)


def _until_next_due(using: str | None, interval: float) -> float:
    """How long the loop may wait for a wake-up: ``interval``, or less when a scheduled
    row (a ``send_at``, a retry's backoff) falls due sooner, so it is published on time
    rather than up to an interval late."""
    from .models import OutboxMessage

    wait = interval
    for db in [using] if using else databases():
        try:
            soon = OutboxMessage.objects.next_due_in(db, wait)
        except Exception:  # the next pass says what is wrong
            return interval
        if soon is not None:
            wait = min(wait, soon + 0.001)
    return wait


def _hold_while_behind(stop: threading.Event, step: float, alive_for: float) -> None:
    """Wait while delivery messages queue up for a free worker (at most
    ``NOTIFICATIONS_RELAY_HOLD_MAX`` seconds).

    Rows published now would only wait behind those messages, so holding them costs
    no latency, and they go out later in fewer, fuller messages: one claim transaction
    and one broker message for up to ``NOTIFICATIONS_DELIVERY_BATCH_SIZE`` emails
    instead of a few each. When the workers keep up the queue is empty and nothing is
    held. The rows are committed all along: a crash here delays them, never loses them.
    """
    from celery import current_app

    from . import broker, locks

    now = beat = time.monotonic()
    deadline = now + float(settings.RELAY_HOLD_MAX)
    while now < deadline and broker.deliveries_waiting(current_app) > 0 and not _high_due():
        if stop.wait(step):
            return
        now = time.monotonic()
        if alive_for and now - beat >= 1.0:  # alive and publishing: commits keep waking this loop
            locks.heartbeat(key(LOOP_ALIVE), alive_for)
            beat = now


def _high_due() -> bool:
    """Whether a high-priority row waits: it goes out at once, backlog or not."""
    from .models import OutboxMessage

    try:
        return any(OutboxMessage.objects.high_due(db) for db in databases())
    except Exception:
        return True  # the pass that follows says what is wrong


def start_loop() -> threading.Thread:
    """Start ``relay_forever`` in a daemon thread (beat does this on start)."""
    stop = threading.Event()
    thread = threading.Thread(target=relay_forever, args=(stop,), name="notifications-relay", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread


def recover_stalled(using: str | None = None) -> list[str]:
    """Give a new message to keys whose delivery stalled (see
    ``SentEmailManager.requeue_stalled`` and ``requeue_unclaimed``): claims whose holder
    stopped renewing them, retries whose message was lost, and notifications whose
    message was lost before any worker took them. The last are looked for only while no
    delivery message waits in the queue (on Kafka: in their partition), so that a
    backlog is not mistaken for loss."""
    from celery import current_app

    from . import broker, kafka
    from .models import SentEmail

    db = using or settings.DATABASE
    lease = float(settings.CLAIM_LEASE)
    grace = float(settings.RECOVER_GRACE)
    released_for = float(settings.RETRY_BACKOFF_MAX) + 2 * lease + 60.0
    keys = SentEmail.objects.requeue_stalled(grace, lease + grace, released_for, db)
    unclaimed_after = float(settings.RECOVER_UNCLAIMED_AFTER)
    if kafka.enabled():
        # Per partition: one stalled partition says nothing of the others.
        settled = kafka.settled_partitions()
        counts = kafka.partition_counts() if settled is not None else None
        if settled is not None and counts is not None:
            high, normal = str(settings.KAFKA_HIGH_TOPIC), str(settings.KAFKA_TOPIC)

            def in_settled(user: str, priority: str) -> bool:
                topic = high if priority == "high" else normal
                return (topic, kafka.partition_for(user, counts[topic])) in settled

            keys += SentEmail.objects.requeue_unclaimed(unclaimed_after, db, keep=in_settled)
    elif broker.deliveries_waiting(current_app) == 0:
        keys += SentEmail.objects.requeue_unclaimed(unclaimed_after, db)
    if keys:
        logger.warning("requeued %d stalled notification(s), e.g. %s", len(keys), keys[0])
        events.recovered(keys)
        wake_relay()
    return keys
