"""Delivery: record the notification by key, take the Redis lock and the database
claim, send through Django's email backend, record the outcome.

The order of writes is the whole design. ``send_started_at`` is committed before the
SMTP transaction begins and cleared when its outcome is recorded, so a worker that
finds it set on an expired claim knows the previous holder died mid-send: the one
window nobody can close, which is counted as ambiguous and resolved by the
``NOTIFICATIONS_AMBIGUOUS`` setting. Every write after the claim carries the fencing
token, so a worker that was paused past its lease cannot overwrite its successor; and
while it lives, a worker renews its leases (``leases.py``), so only a dead or cut-off
holder loses a claim, within a lease of its last renewal.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import DatabaseError, close_old_connections, connections, transaction
from django.utils import timezone

from . import backends, events, locks, mail, metrics, ratelimit
from .conf import settings
from .exceptions import (
    AmbiguousDeliveryError,
    MailServerUnreachable,
    PermanentDeliveryError,
    TransientDeliveryError,
    UnbuildableEmail,
)
from .faults import crash_point
from .leases import holder
from .managers import Finish, Start, parse_moment
from .models import ClaimState, Notification, SentEmail, message_id_for

logger = logging.getLogger(__name__)

RECORD_RETRIES = 5


@dataclass(frozen=True)
class Outcome:
    """What a delivery attempt ended with, as the task reports it."""

    key: str
    status: str  # sent | failed | held | duplicate | retry
    detail: str = ""
    retry_in: float = 0.0
    attempts: int = 0
    reason: str = ""  # why, in a word: a failure's category (metrics.FAILURE_REASONS), or a retry's


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _retry_delay(attempts: int) -> float:
    """Exponential backoff with full jitter (as Celery's ``retry_jitter``), in seconds:
    uniform in [0, min(max, factor * 2**(attempts-1))], never quite zero."""
    ceiling = min(float(settings.RETRY_BACKOFF_MAX), float(settings.RETRY_BACKOFF) * 2 ** max(attempts - 1, 0))
    return max(random.uniform(0, ceiling), ceiling / 20)


@dataclass
class _Item:
    """A claimed notification of the batch, on its way to the mail server."""

    payload: dict[str, Any]
    token: int
    attempts: int  # attempts before this one
    ambiguous: bool  # the takeover found the previous send's outcome unknown
    pk: int = 0  # the notification's id in this database

    @property
    def key(self) -> str:
        return str(self.payload["key"])

    def start(self, lease: float) -> Start:
        return Start(self.key, self.token, lease, message_id_for(self.key))


def _age(payload: dict[str, Any]) -> float:
    """Seconds since the notification was committed (0 when the payload does not say)."""
    created = payload.get("created_at")
    if not created:
        return 0.0
    try:
        when = datetime.fromisoformat(str(created))
    except ValueError:
        return 0.0
    if timezone.is_naive(when):
        when = timezone.make_aware(when, UTC)
    return max(0.0, (timezone.now() - when).total_seconds())


# Seconds before a notification's expires_at in which no send is started: the SMTP
# transaction must end (the server's acceptance) before the expiry, not just begin.
EXPIRY_MARGIN = 1.0


def expired(payload: dict[str, Any], margin: float = 0.0) -> bool:
    """Whether ``payload``'s ``expires_at`` has passed (or comes within ``margin`` seconds)."""
    until = parse_moment(payload.get("expires_at"))
    return until is not None and (until - timezone.now()).total_seconds() <= margin


def not_due_for(payload: dict[str, Any]) -> float:
    """Seconds until ``payload``'s ``send_at`` (0 when it is due)."""
    when = parse_moment(payload.get("send_at"))
    return max(0.0, (when - timezone.now()).total_seconds()) if when is not None else 0.0


def _unreachable_delay(age: float) -> float:
    """Backoff while the mail server cannot be reached, which is not an attempt: a
    quarter of the notification's age, between the backoff factor and its cap, with
    jitter, so an outage of minutes costs seconds of retries and one of hours, minutes."""
    ceiling = min(float(settings.RETRY_BACKOFF_MAX), max(float(settings.RETRY_BACKOFF), age / 4))
    return random.uniform(ceiling / 2, ceiling)


def deliver_many(payloads: Sequence[dict[str, Any]], budget: float = 60.0) -> list[Outcome]:
    """Deliver a batch of notifications, each at most once per key (see the module
    docstring), over this process's reused mail-server connections. One outcome per
    payload, in order.

    Per batch: one pipelined Redis round trip each way, and one transaction that
    records the notifications and claims their keys. Per group of emails a sending
    lane makes (``_send_lane``): one statement that records the last group's outcomes
    and stamps the next group's starts, then each email's SMTP transaction.
    Outcomes are per item: a bounce or a busy key never holds back the others. An
    item that should be tried again later ends ``retry`` (with ``retry_in``); the task
    puts those into one new message. After ``budget`` seconds, or once the mail server
    cannot be reached, the items not yet attempted are released to that retry.

    Database and Redis errors before the first send propagate (nothing was sent; the
    whole message is retried).
    """
    db = settings.DATABASE
    lease = float(settings.CLAIM_LEASE)
    began = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    batch: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        crash_point("before_claim", payload["key"])
        # The same key twice in one message: one delivery, reported twice.
        batch.setdefault(payload["key"], payload)
    keys = list(batch)
    with locks.fast_path(keys, ttl=lease) as locked:
        for key in keys:
            if key not in locked.keys:
                wait = min(lease, locked.busy_for.get(key, 1.0)) + 0.2
                outcomes[key] = Outcome(key, "retry", detail="locked by another worker", retry_in=wait, reason="busy")
                events.delivered("busy", key, retry_in=wait, detail="locked by another worker")
        to_send = _claim([p for k, p in batch.items() if k in locked.keys], lease, db, outcomes, locked.token)
        try:
            _send_all(to_send, lease, db, began + budget, outcomes)
        finally:
            holder.release((i.key, i.token) for i in to_send)
    return [outcomes[p["key"]] for p in payloads]


def _claim(
    batch: list[dict[str, Any]], lease: float, db: str, outcomes: dict[str, Outcome], lock_token: bytes | None
) -> list[_Item]:
    """The batch's one transaction: record, claim, and settle what cannot be sent.
    Returns the items to send, held by this process (their leases renewed) from now."""
    if not batch:
        return []
    sent_at = time.monotonic()  # the transaction, and the leases it sets, begin after this
    with transaction.atomic(using=db):
        pks = Notification.objects.record_many(batch, db)
        claims = SentEmail.objects.claim_many([(p["key"], pks[p["key"]]) for p in batch], owner_name(), lease, db)
        settled: list[Finish] = []
        to_send: list[_Item] = []
        for payload in batch:
            key = payload["key"]
            claim = claims[key]
            if claim.outcome == "busy":
                outcomes[key] = Outcome(
                    key, "retry", detail="claimed by another worker", retry_in=claim.retry_in, reason="busy"
                )
            elif claim.outcome == "done":
                status = "cancelled" if claim.state == ClaimState.CANCELLED else "duplicate"
                outcomes[key] = Outcome(key, status, detail=claim.state)
            elif expired(payload, margin=EXPIRY_MARGIN):
                # Before anything else: whatever happened to an earlier send, none may follow.
                reason = "expired: its expires_at passed before it could be sent"
                settled.append(Finish(key, claim.token, ClaimState.EXPIRED, reason, claim.attempts, claim.ambiguous))
                outcomes[key] = Outcome(key, "expired", detail=reason, attempts=claim.attempts, reason="expired")
            elif (early := not_due_for(payload)) > 0:
                # Published before its send_at (a clock ahead, an earlier release): back to
                # the outbox, due then. No attempt.
                reason = "not attempted: not due until its send_at"
                settled.append(Finish(key, claim.token, ClaimState.RELEASED, reason, claim.attempts))
                outcomes[key] = Outcome(
                    key, "retry", detail=reason, retry_in=early, attempts=claim.attempts, reason="not_due"
                )
            elif claim.ambiguous and settings.AMBIGUOUS == "hold":
                # Before the attempt limit: a send that may have reached the server is
                # for a person to decide, never a "failed" that a retry would resend.
                logger.warning("%s: previous holder died mid-send; outcome unknown, held", key)
                reason = "held: a previous send may have reached the mail server; decide in the admin"
                settled.append(Finish(key, claim.token, ClaimState.HELD, reason, claim.attempts, ambiguous=True))
                outcomes[key] = Outcome(key, "held", detail=reason, attempts=claim.attempts)
            elif claim.attempts >= int(settings.MAX_ATTEMPTS):
                # Every attempt so far ended with its worker dying mid-send: stop here.
                reason = f"gave up after {claim.attempts} attempts; the last ended without a recorded outcome"
                settled.append(Finish(key, claim.token, ClaimState.FAILED, reason, claim.attempts, claim.ambiguous))
                outcomes[key] = Outcome(
                    key, "failed", detail=reason, attempts=claim.attempts, reason="attempts_exhausted"
                )
            else:
                if claim.ambiguous:
                    logger.warning("%s: previous holder died mid-send; outcome unknown, resending", key)
                to_send.append(_Item(payload, claim.token, claim.attempts, claim.ambiguous, pks[key]))
        written: set[str] = set()
        if settled:
            written = SentEmail.objects.settle(settled, None, db)[0]
            _check_written(settled, written)
        SentEmail.objects.mark_sending([(pks[i.key], i.ambiguous) for i in to_send], db)
        # Counted once this transaction commits: a rolled-back claim counts nothing.
        transaction.on_commit(
            lambda: _report_claims(batch, pks, claims, settled, written, outcomes), using=db, robust=True
        )
    tokens = {lock_token} if lock_token else set()
    holder.hold({i.key: i.token for i in to_send}, sent_at, {i.key: t for i in to_send for t in tokens})
    return to_send


def _report_claims(
    batch: list[dict[str, Any]],
    pks: dict[str, int],
    claims: dict[str, Any],
    settled: list[Finish],
    written: set[str],
    outcomes: dict[str, Outcome],
) -> None:
    """Count and log what the claim transaction committed (see ``events``)."""
    finished = {f.key: f for f in settled}
    for payload in batch:
        key = payload["key"]
        claim, pk = claims[key], pks.get(key)
        if claim.outcome == "busy":
            events.delivered("busy", key, pk, retry_in=claim.retry_in, detail="claimed by another worker")
            continue
        if claim.outcome == "done":
            kind = "cancelled" if claim.state == ClaimState.CANCELLED else "duplicate"
            events.delivered(kind, key, pk, detail=f"already {claim.state}")
            continue
        events.claimed(key, pk, claim.attempts + 1, claim.token, claim.takeover)
        finish = finished.get(key)
        if finish is None:  # to be sent; a resend after an unknown outcome counted ambiguous
            if claim.ambiguous:
                events.ambiguous(key, pk, claim.attempts, "resend")
        elif key not in written:
            events.delivered("claim_lost", key, pk, claim.attempts, detail=f"{finish.state} not recorded")
        elif finish.state in (ClaimState.RELEASED, ClaimState.EXPIRED):
            outcome = outcomes[key]
            kind = "expired" if finish.state == ClaimState.EXPIRED else "deferred"
            events.delivered(kind, key, pk, claim.attempts, retry_in=outcome.retry_in or None, detail=outcome.detail)
        else:
            if finish.ambiguous:
                events.ambiguous(key, pk, claim.attempts, "hold" if finish.state == ClaimState.HELD else "fail")
            outcome = outcomes[key]
            events.delivered(
                "held" if finish.state == ClaimState.HELD else "failed",
                key,
                pk,
                claim.attempts,
                reason=outcome.reason or None,
                detail=outcome.detail,
            )


# What an ambiguous send of a finished attempt led to, by the state it was recorded in.
_AMBIGUOUS_ACTION = {"released": "resend", "held": "hold", "failed": "fail"}


def _report(lanes: _Lanes, settled: Sequence[Finish], written: set[str]) -> None:
    """Count and log outcomes a lane's statement just committed (see ``events``); never
    raises into the lane, which has the next email to send."""
    try:
        _count(lanes, settled, written)
    except Exception:
        logger.exception("could not count %d outcome(s)", len(settled))


def _count(lanes: _Lanes, settled: Sequence[Finish], written: set[str]) -> None:
    for finish in settled:
        item = lanes.items[finish.key]
        outcome = lanes.outcomes.get(finish.key)
        reason = (outcome.reason if outcome is not None else "") or None
        detail = outcome.detail if outcome is not None else finish.response
        if finish.key not in written:
            events.delivered("claim_lost", finish.key, item.pk, finish.attempts, detail=f"{finish.state} not recorded")
            continue
        if finish.ambiguous:
            events.ambiguous(finish.key, item.pk, finish.attempts, _AMBIGUOUS_ACTION.get(str(finish.state), "fail"))
        if finish.state == ClaimState.SENT:
            latency = events.age_seconds(item.payload.get("created_at"))
            events.delivered("sent", finish.key, item.pk, finish.attempts, latency=latency)
        elif finish.state == ClaimState.EXPIRED:
            events.delivered("expired", finish.key, item.pk, finish.attempts, detail=detail)
        elif finish.state == ClaimState.RELEASED:
            kind = "retried" if finish.attempts > item.attempts else "deferred"
            retry_in = outcome.retry_in if outcome is not None else None
            events.delivered(
                kind, finish.key, item.pk, finish.attempts, reason=reason, retry_in=retry_in, detail=detail
            )
        else:
            kind = "held" if finish.state == ClaimState.HELD else "failed"
            events.delivered(kind, finish.key, item.pk, finish.attempts, reason=reason, detail=detail)


# Sending threads per worker process, each with its own mail-server and database
# connection, shared by the batches this process runs (created after the fork). One pool
# per backend (or set of backends, for a mixed batch), no larger than its lanes: a thread
# keeps its connection open between batches, so only a pool of its own keeps a backend
# within its CONNECTIONS limit.
_lanes: tuple[int, dict[tuple[str, ...], ThreadPoolExecutor]] | None = None
_lanes_lock = threading.Lock()


def _executor(size: int, names: tuple[str, ...] = ()) -> ThreadPoolExecutor:
    global _lanes
    with _lanes_lock:
        if _lanes is None or _lanes[0] != os.getpid():
            _lanes = (os.getpid(), {})
        pools = _lanes[1]
        pool = pools.get(names)
        if pool is None or pool._max_workers < size:
            pool = pools[names] = ThreadPoolExecutor(
                max_workers=size, thread_name_prefix=f"notifications-send-{'-'.join(names) or 'default'}"
            )
        return pool


def _backend_name(item: _Item) -> str | None:
    """The backend ``item`` goes through ("" or absent: the default)."""
    return str(item.payload.get("backend") or "") or None


def _lane_count(to_send: list[_Item]) -> tuple[int, tuple[str, ...]]:
    """How many lanes a batch gets, and the backends they serve: SEND_CONCURRENCY, no
    more than the batch's items, and no more than any of its backends' CONNECTIONS (per
    worker process: the total is CONNECTIONS x worker processes). The relay puts one
    backend in a message; a mixed one keeps to the smallest limit among them."""
    size = max(1, min(len(to_send), int(settings.SEND_CONCURRENCY)))
    names: set[str] = set()
    for item in to_send:
        try:
            backend = backends.get(_backend_name(item))
        except KeyError:  # not configured here: its items are released untried (mail.connection)
            continue
        names.add(backend.name)
        if backend.connections:
            size = min(size, backend.connections)
    return size, tuple(sorted(names))


@dataclass
class _Lanes:
    """What the lanes of one batch share."""

    queue: deque[_Item]
    lease: float
    db: str
    deadline: float
    outcomes: dict[str, Outcome]
    unreachable: threading.Event
    stop: threading.Event
    items: dict[str, _Item]

    def over(self) -> bool:
        """Whether nothing more is sent now: the server is unreachable, the task stops, or
        the time budget is spent."""
        return self.unreachable.is_set() or self.stop.is_set() or time.monotonic() > self.deadline


def _send_all(to_send: list[_Item], lease: float, db: str, deadline: float, outcomes: dict[str, Outcome]) -> None:
    """Send the claimed items over ``NOTIFICATIONS_SEND_CONCURRENCY`` connections at once
    (fewer where the backend's ``CONNECTIONS`` says so, see ``_lane_count``), each lane
    taking the next group of items when its last group is sent (as ``_send_lane`` says).
    The round trips to the mail server and the database are waits, so lanes overlap
    them, and a slow email holds up only its own lane.

    The lanes are threads, also when there is one, and the task only waits for them: the
    soft time limit (or anything else that interrupts the task) lands in that wait, and
    then the lanes finish the email each is sending, record what they sent, release
    the rest untried (stamped or not) and stop, so no lane outlives its task.
    """
    if not to_send:
        return
    size, names = _lane_count(to_send)
    shared = _Lanes(
        deque(to_send), lease, db, deadline, outcomes, threading.Event(), threading.Event(), {i.key: i for i in to_send}
    )
    pool = _executor(size, names)
    futures = [pool.submit(_send_lane, shared) for _ in range(size)]
    try:
        concurrent.futures.wait(futures)
    except BaseException:
        shared.stop.set()
        concurrent.futures.wait(futures)
        raise
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error


def _next(queue: deque[_Item]) -> _Item | None:
    try:
        return queue.popleft()  # atomic: lanes share the queue
    except IndexError:
        return None


def _send_lane(lanes: _Lanes) -> None:
    """Send items over this thread's connection, a group at a time. Committed before a
    group is sent: the ``send_started_at`` of each of its emails, in the same statement
    that records the previous group's outcomes, so a group costs one database round
    trip and the window of unknown outcome is the group: at most
    ``NOTIFICATIONS_RECORD_GROUP`` emails, and a lane records the outcomes it has once
    the oldest of them is ``NOTIFICATIONS_RECORD_GROUP_MS`` old (``_group_size`` makes
    groups that fit that time, so a slow mail server gets groups of one).

    Before that statement the lane makes sure its connection to the mail server is open:
    a server that cannot be reached costs no attempt and no ambiguity, and then no lane
    tries the rest of the batch now. Then it takes each item's slot under its backend's
    rate limit (``_take_slot``; a rate-limited email is a group of its own); a token is
    never taken after the start is stamped. Once the time budget is spent, or the task
    stops, what is left (stamped or not) is released untried."""
    settled: list[Finish] = []
    last: Outcome | None = None
    stamped: deque[_Item] = deque()  # started (committed), not yet sent
    oldest = 0.0  # when the oldest outcome in ``settled`` came in
    limit = float(settings.RECORD_GROUP_MS) / 1000.0
    while True:
        if lanes.over():
            settled += _release(lanes, list(stamped), last) + _release_rest(lanes, last)
            stamped.clear()
        if stamped:
            item = stamped.popleft()
            if settled and not mail.has_connection(_backend_name(item)):
                # The last send dropped the connection, and opening one may take up to
                # EMAIL_TIMEOUT: what is known is recorded before that wait.
                settled = _record(lanes, settled)
            crash_point("before_send", item.key)
            finish, last, reachable = _attempt(item, lanes.lease)
            lanes.outcomes[item.key] = last
            if not settled:
                oldest = time.monotonic()
            settled.append(finish)
            if not reachable:
                lanes.unreachable.set()
            elif stamped and time.monotonic() - oldest >= limit:
                # The group takes longer than planned: what is known is recorded now.
                settled = _record(lanes, settled)
            continue
        group, settled, last = _gather(lanes, settled, last, limit)
        sent_at = time.monotonic()
        started = _write(lanes, settled, [i.start(lanes.lease) for i in group])
        if last is not None and last.status == "sent":
            crash_point("after_record", last.key)
        settled, last = [], None
        if not group and not lanes.queue:
            return
        for item in group:
            if item.key not in started:  # taken over since the claim: not ours to send
                lanes.outcomes[item.key] = Outcome(
                    item.key, "retry", detail="taken over by another worker", retry_in=1.0
                )
                events.delivered("claim_lost", item.key, item.pk, item.attempts, detail="taken over before the send")
                holder.release([(item.key, item.token)])
                continue
            holder.renewed(item.key, item.token, sent_at)
            # Committed: send_started_at is set. From here to the outcome record is the window.
            stamped.append(item)


def _gather(
    lanes: _Lanes, settled: list[Finish], last: Outcome | None, limit: float
) -> tuple[list[_Item], list[Finish], Outcome | None]:
    """The next group: items of one backend taken from the shared queue, as many as
    that backend sends in ``limit`` seconds lately (``_group_size``), whose mail server
    is connected and whose rate-limit slot is taken. An item that cannot go
    (unreachable, no slot within the budget) ends the group with its outcome in
    ``settled``, and so does a rate-limited backend: its slot is its send time."""
    group: list[_Item] = []
    size, backend = 1, ""
    while len(group) < size:
        if lanes.over():
            break
        item = _next(lanes.queue)
        if item is None:
            break
        name = _backend_name(item)
        if not group:
            backend, size = name or "", _group_size(limit, name)
        elif (name or "") != backend:
            lanes.queue.appendleft(item)  # the next group's (another lane may take it first)
            break
        if settled and not mail.has_connection(name):
            # Connecting may take up to EMAIL_TIMEOUT: record the outcomes first, so
            # that a crash in the wait leaves none of them unknown.
            settled = _record(lanes, settled)
        try:
            mail.connection(name)
        except MailServerUnreachable as exc:
            finish, last = _unreachable(item, exc)
            lanes.outcomes[item.key] = last
            settled.append(finish)
            lanes.unreachable.set()
            break
        settled, release = _take_slot(lanes, item, settled)
        if release is not None:
            finish, last = release
            lanes.outcomes[item.key] = last
            settled.append(finish)
            # Slots only move forward: none is left within this budget for the rest
            # either, so the batch's budget is spent (each lane releases what is left).
            lanes.deadline = min(lanes.deadline, time.monotonic())
            break
        group.append(item)
    if group and lanes.over():
        # Gathered before the batch stopped (another lane found the server away, the
        # budget ran out): released untried, never stamped.
        settled += _release(lanes, group, last)
        group = []
    return group, settled, last


# How long each backend's SMTP transaction (or API call) takes in this process, lately
# (a moving average), so that a group is made of what fits in RECORD_GROUP_MS. Only real
# sends count: an email released or expired before its send says nothing of the server.
_pace: dict[str, float] = {}


def _group_size(limit: float, name: str | None) -> int:
    """Emails of backend ``name`` in the next group: as many as it sends in ``limit``
    seconds at its recent pace, at least one and at most ``NOTIFICATIONS_RECORD_GROUP``
    (one before any send of it was timed, and always one for a rate-limited backend)."""
    most = max(1, int(settings.RECORD_GROUP))
    pace = _pace.get(name or "", 0.0)
    try:
        limited = bool(backends.get(name).rate)
    except KeyError:  # not configured here: mail.connection() refuses it next
        return 1
    if most == 1 or not pace or limited:
        return 1
    return max(1, min(most, int(limit / pace)))


def _send(item: _Item) -> str:
    """``mail.send`` of the item's email, timed for its backend's pace."""
    name = _backend_name(item)
    began = time.monotonic()
    try:
        return mail.send(mail.build_message(item.payload), name)
    finally:
        took, before = time.monotonic() - began, _pace.get(name or "")
        _pace[name or ""] = took if before is None else 0.8 * before + 0.2 * took


def _write(lanes: _Lanes, settled: list[Finish], starts: Sequence[Start] = ()) -> set[str]:
    """Record the outcomes in ``settled`` and stamp ``starts``, in one statement, and
    report the outcomes; returns the keys whose start was stamped."""
    written, started = _settle(settled, starts, lanes.db)
    _check_written(settled, written)
    _report(lanes, settled, written)
    holder.release((f.key, f.token) for f in settled)
    return started


def _record(lanes: _Lanes, settled: list[Finish]) -> list[Finish]:
    """Record the outcomes in ``settled`` now, with no start: before the lane waits (to
    connect, or for a rate limit), or when its group runs late. Returns what is left to
    record: nothing."""
    _write(lanes, settled)
    return []


# Waits shorter than this are not worth a statement of their own: the next one (which
# stamps the start) takes about as long.
SLOT_SLACK = 0.002
# The longest single sleep of a waiting lane, so that it sees its task stop promptly.
WAIT_STEP = 0.1


def _take_slot(lanes: _Lanes, item: _Item, settled: list[Finish]) -> tuple[list[Finish], tuple[Finish, Outcome] | None]:
    """Wait for ``item``'s slot under its backend's rate limit (``ratelimit.py``), before
    its start is stamped. Waiting is no attempt and loses nothing.

    Before any wait the previous outcomes (``settled``) are recorded without a start,
    so no outcome stays unknown through the wait. A slot is taken only if it
    comes before the batch's time budget ends; if none can, or the task stops while the
    lane waits, ``item`` is released untried (no attempt) and goes back through the
    outbox. Returns what is left to record, and the release, if any."""
    backend = backends.get(_backend_name(item))  # known: mail.connection() accepted it
    if not backend.rate:
        return settled, None
    waited = 0.0
    try:
        while True:
            left = lanes.deadline - time.monotonic()
            grant = _grant(backend, left, lanes.db, settled) if left > 0 and not lanes.stop.is_set() else None
            if grant is not None and grant.granted and grant.wait <= SLOT_SLACK:
                return settled, None
            if settled:
                settled = _record(lanes, settled)
            # Refused: its slot would come after the budget ends (slots are never given
            # back), so there is no waiting for it.
            if grant is None or (
                not grant.granted and grant.wait >= lanes.deadline - time.monotonic() - ratelimit.HORIZON
            ):
                return settled, _rate_limited(item, lanes, grant.wait if grant is not None else 0.0)
            until = time.monotonic() + grant.wait
            while (pause := until - time.monotonic()) > 0:
                if lanes.stop.wait(min(pause, WAIT_STEP)):
                    return settled, _rate_limited(item, lanes, 0.0)
            waited += grant.wait
            if grant.granted:
                return settled, None
    finally:
        if waited:
            metrics.RATE_LIMIT_WAITS.labels(backend.name).inc(waited)


def _grant(backend: backends.Backend, within: float, db: str, settled: list[Finish]) -> ratelimit.Grant:
    """``ratelimit.acquire`` in autocommit, retried on database errors like ``_settle``;
    if the database stays away, the outcomes in ``settled`` are recorded (or tried)
    before the error goes up."""
    assert backend.rate
    for attempt in range(RECORD_RETRIES):
        try:
            return ratelimit.acquire(backend.name, backend.rate, within, db)
        except DatabaseError:
            if attempt == RECORD_RETRIES - 1:
                if settled:
                    _settle(settled, [], db)
                raise
            close_old_connections()
            connections[db].close()
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _rate_limited(item: _Item, lanes: _Lanes, wait: float) -> tuple[Finish, Outcome]:
    """Release ``item`` untried: its backend's rate limit had no slot for it before the
    task's time budget ran out (or the task stopped). No attempt; it is due again soon."""
    why = "the task was stopped" if lanes.stop.is_set() else "this batch's time budget ran out"
    reason = f"not attempted: waiting for the backend's rate limit when {why}"
    retry_in = min(max(wait, 0.05), 1.0)
    finish = Finish(item.key, item.token, ClaimState.RELEASED, reason, item.attempts)
    return finish, Outcome(
        item.key, "retry", detail=reason, retry_in=retry_in, attempts=item.attempts, reason="rate_limited"
    )


def _release_rest(lanes: _Lanes, last: Outcome | None) -> list[Finish]:
    """Release the items no lane has taken yet, untried (no attempt, no ambiguity)."""
    left = []
    while (item := _next(lanes.queue)) is not None:
        left.append(item)
    return _release(lanes, left, last)


def _release(lanes: _Lanes, items: Sequence[_Item], last: Outcome | None) -> list[Finish]:
    """Release ``items``, none of which was tried (stamped or not): no attempt, no
    ambiguity (recording the release clears a stamped start)."""
    if not items:
        return []
    if lanes.unreachable.is_set():
        why = "the mail server is unreachable"
    elif lanes.stop.is_set():
        why = "the task was stopped (time limit or shutdown)"
    else:
        why = "this batch's time budget ran out"
    reason = f"not attempted: {why}"
    retry_in = last.retry_in if last is not None and lanes.unreachable.is_set() else 0.0
    released = []
    for left in items:
        released.append(Finish(left.key, left.token, ClaimState.RELEASED, reason, left.attempts))
        lanes.outcomes[left.key] = Outcome(left.key, "retry", detail=reason, retry_in=retry_in, reason="not_attempted")
    return released


def _unreachable(item: _Item, exc: Exception) -> tuple[Finish, Outcome]:
    """The mail server could not be reached for ``item``: nothing was sent, so it is no
    attempt; it is tried again after a backoff that grows with its age, and only a
    notification that could not be handed over for ``NOTIFICATIONS_GIVE_UP_AFTER``
    seconds ends failed."""
    key, age = item.key, _age(item.payload)
    give_up = float(settings.GIVE_UP_AFTER)
    if age > give_up:
        reason = f"gave up: the mail server could not be reached for {age / 3600:.1f} h; last error: {exc}"
        return Finish(key, item.token, ClaimState.FAILED, reason, item.attempts), Outcome(
            key, "failed", detail=reason, attempts=item.attempts, reason="unreachable_too_long"
        )
    reason = f"not attempted: the mail server is unreachable ({exc})"
    finish = Finish(key, item.token, ClaimState.RELEASED, reason, item.attempts)
    return finish, Outcome(
        key, "retry", detail=reason, retry_in=_unreachable_delay(age), attempts=item.attempts, reason="unreachable"
    )


def _attempt(item: _Item, lease: float) -> tuple[Finish, Outcome, bool]:
    """One SMTP transaction: what to record, what to report, and whether the mail
    server is reachable (False: do not try the rest of the batch now)."""
    key, attempts = item.key, item.attempts + 1
    # The lease is certainly ours for a while yet? A process paused (or cut off from its
    # database) since the start was stamped must not send on a claim that may be gone.
    if holder.remaining(key, item.token) < lease / 2:
        reason = "not attempted: the claim's lease could not be renewed in time"
        finish = Finish(key, item.token, ClaimState.RELEASED, reason, item.attempts)
        return finish, Outcome(key, "retry", detail=reason, retry_in=1.0, attempts=item.attempts, reason="lease"), True
    if expired(item.payload, margin=EXPIRY_MARGIN):
        reason = "expired: its expires_at came before it could be sent"
        finish = Finish(key, item.token, ClaimState.EXPIRED, reason, item.attempts)
        return finish, Outcome(key, "expired", detail=reason, attempts=item.attempts, reason="expired"), True
    try:
        response = _send(item)
    except PermanentDeliveryError as exc:
        category = "could_not_build" if isinstance(exc, UnbuildableEmail) else "rejected"
        finish = Finish(key, item.token, ClaimState.FAILED, str(exc), attempts)
        return finish, Outcome(key, "failed", detail=str(exc), attempts=attempts, reason=category), True
    except AmbiguousDeliveryError as exc:
        return (*_after_transient(item, exc, ambiguous=True), True)
    except MailServerUnreachable as exc:
        return (*_unreachable(item, exc), False)
    except TransientDeliveryError as exc:
        return (*_after_transient(item, exc, ambiguous=False), True)
    except Exception as exc:  # building the message (Django, a custom backend's code)
        finish = Finish(key, item.token, ClaimState.FAILED, f"the email could not be built: {exc!r}", attempts)
        return finish, Outcome(key, "failed", detail=finish.response, attempts=attempts, reason="could_not_build"), True
    crash_point("after_reply", key)
    finish = Finish(key, item.token, ClaimState.SENT, response, attempts)
    return finish, Outcome(key, "sent", detail=response, attempts=attempts), True


def _after_transient(item: _Item, exc: Exception, ambiguous: bool) -> tuple[Finish, Outcome]:
    key, attempts = item.key, item.attempts + 1
    reason = f"attempt {attempts}: {exc}"
    why = "connection_lost" if ambiguous else "transient"
    if ambiguous and settings.AMBIGUOUS == "hold":
        finish = Finish(key, item.token, ClaimState.HELD, f"held: {reason}", attempts, ambiguous=True)
        return finish, Outcome(key, "held", detail=reason, attempts=attempts, reason=why)
    if attempts >= int(settings.MAX_ATTEMPTS):
        final = f"gave up after {attempts} attempts; last error: {exc}"
        finish = Finish(key, item.token, ClaimState.FAILED, final, attempts, ambiguous=ambiguous)
        return finish, Outcome(key, "failed", detail=final, attempts=attempts, reason="attempts_exhausted")
    finish = Finish(key, item.token, ClaimState.RELEASED, reason, attempts, ambiguous=ambiguous)
    return finish, Outcome(key, "retry", detail=reason, retry_in=_retry_delay(attempts), attempts=attempts, reason=why)


def _check_written(settled: Sequence[Finish], written: set[str]) -> None:
    for finish in settled:
        if finish.key not in written:
            logger.error(
                "%s: claim lost (token %s is stale); outcome %s not recorded", finish.key, finish.token, finish.state
            )


def _settle(settled: Sequence[Finish], starts: Sequence[Start], db: str) -> tuple[set[str], set[str]]:
    """``SentEmail.objects.settle_group`` in autocommit, retried on database errors.

    After the mail server answered, losing this write would turn a known outcome into
    an ambiguous one, so it is retried (reconnecting) before giving up.
    """
    holder.settling((f.key, f.token) for f in settled)
    for attempt in range(RECORD_RETRIES):
        try:
            return SentEmail.objects.settle_group(settled, starts, db)
        except DatabaseError:
            if attempt == RECORD_RETRIES - 1:
                raise
            close_old_connections()
            connections[db].close()
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def requeue_through_outbox(payloads: Sequence[dict[str, Any]], due_in: float = 0.0) -> int:
    """Queue ``payloads`` again as outbox rows of this service's database, due in
    ``due_in`` seconds (a retry's backoff), for when the broker will not take their next
    message now; return how many rows were added (a notification with an unpublished
    row already gets none). The relay publishes them once due and the broker takes
    messages again, and the claims keep it to one email."""
    from .models import OutboxMessage

    db = settings.DATABASE
    unique = list({p["key"]: p for p in payloads}.values())
    with transaction.atomic(using=db):
        pks = Notification.objects.record_many(unique, db)
        added = OutboxMessage.objects.queue_again(sorted(pks.values()), db, due_in=due_in)
    if added:
        from .relay import wake_relay_in

        wake_relay_in(due_in)
    return added
