"""Delivery: record the notification by key, take the Redis lock and the database
claim, send through Django's email backend, record the outcome.

The order of writes is the whole design. ``send_started_at`` is committed before the
SMTP transaction begins and cleared when its outcome is recorded, so a worker that
finds it set on an expired claim knows the previous holder died mid-send: the one
window nobody can close, which is counted as ambiguous and resolved by the
``NOTIFICATIONS_AMBIGUOUS`` setting. Every write after the claim carries the fencing
token, so a worker that was paused past its lease cannot overwrite its successor.
"""

from __future__ import annotations

import logging
import os
import random
import smtplib
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.db import DatabaseError, close_old_connections, connections, transaction

from . import locks
from .conf import settings
from .exceptions import (
    AmbiguousDeliveryError,
    MailServerUnreachable,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from .faults import crash_point
from .managers import Finish, Start
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


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def build_message(payload: dict[str, Any]) -> EmailMultiAlternatives:
    """The email for a payload; both headers are a pure function of the key."""
    key = payload["key"]
    message = EmailMultiAlternatives(
        subject=payload["subject"],
        body=payload["body"],
        from_email=payload.get("from_email") or django_settings.DEFAULT_FROM_EMAIL,
        to=[payload["to"]],
        headers={"Message-ID": message_id_for(key), "X-Notification-Key": key},
    )
    if payload.get("html_body"):
        message.attach_alternative(payload["html_body"], "text/html")
    return message


# One mail-server connection per sending thread, reused across emails: connecting and
# saying EHLO costs more than sending a small message. Kept with the pid, so that a
# forked child never writes to its parent's socket.
_local = threading.local()

# A connection used this recently is taken as open without asking: mail servers drop
# idle clients after minutes, not seconds, and a NOOP per email costs a round trip.
FRESH_SECONDS = 1.0


def _drop_connection() -> None:
    held = getattr(_local, "connection", None)
    if held is not None and held[0] == os.getpid():
        try:
            held[1].close()
        except Exception:  # closing a broken connection must not mask the outcome
            pass
    _local.connection = None


def _reusable(backend: Any) -> bool:
    """A NOOP on a connection that sat idle: a server that timed it out answers no more,
    and finding that out before MAIL FROM keeps the failure on the safe side (nothing
    sent)."""
    smtp = getattr(backend, "connection", None)
    if smtp is None:  # backends without a socket (console, locmem, most HTTP APIs)
        return True
    if time.monotonic() - getattr(_local, "last_used", 0.0) < FRESH_SECONDS:
        return True
    try:
        return int(smtp.noop()[0]) == 250
    except Exception:
        return False


def _open_connection() -> Any:
    held = getattr(_local, "connection", None)
    if held is not None and held[0] == os.getpid() and _reusable(held[1]):
        return held[1]
    _drop_connection()
    backend = get_connection(fail_silently=False)
    try:
        backend.open()
    except smtplib.SMTPResponseException as exc:
        error = _classify_reply(exc.smtp_code, exc.smtp_error)
        if isinstance(error, TransientDeliveryError):
            raise MailServerUnreachable(f"connect: {error}") from exc
        raise error from exc
    except Exception as exc:
        raise MailServerUnreachable(f"connect: {exc!r}") from exc
    _local.connection = (os.getpid(), backend)
    return backend


def send_email(message: EmailMultiAlternatives) -> str:
    """Hand the message to the mail server through Django's configured email backend,
    and classify every failure.

    Failures while connecting (or a reused connection found dead by NOOP) cannot have
    delivered anything (transient). Once MAIL FROM is sent, an SMTP reply code is
    definitive (4xx transient, 5xx permanent); anything else (a dropped connection, a
    timeout waiting for the reply to DATA, an error from a provider's backend) leaves the
    outcome unknown (ambiguous). After any failure the connection is dropped.
    """
    backend = _open_connection()
    try:
        sent = backend.send_messages([message])
    except smtplib.SMTPRecipientsRefused as exc:
        _drop_connection()
        code, reply = next(iter(exc.recipients.values()))
        raise _classify_reply(code, reply) from exc
    except smtplib.SMTPResponseException as exc:
        _drop_connection()
        raise _classify_reply(exc.smtp_code, exc.smtp_error) from exc
    except Exception as exc:
        _drop_connection()
        raise AmbiguousDeliveryError(f"connection lost during the SMTP transaction: {exc!r}") from exc
    if sent != 1:
        _drop_connection()
        raise AmbiguousDeliveryError("the email backend reported no message sent")
    _local.last_used = time.monotonic()
    return "250 accepted"


def _classify_reply(code: int, reply: bytes | str) -> Exception:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    reason = f"{code} {text}".strip()
    if 500 <= code < 600:
        return PermanentDeliveryError(reason)
    return TransientDeliveryError(reason)


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

    @property
    def key(self) -> str:
        return str(self.payload["key"])

    def start(self, lease: float) -> Start:
        return Start(self.key, self.token, lease, message_id_for(self.key))


def deliver_many(payloads: Sequence[dict[str, Any]], budget: float = 60.0) -> list[Outcome]:
    """Deliver a batch of notifications, each at most once per key (see the module
    docstring), over this process's reused mail-server connections. One outcome per
    payload, in order.

    Per batch: one pipelined Redis round trip each way, and one transaction that
    records the notifications and claims their keys. Per email: the SMTP transaction
    and one statement that records its outcome and stamps the next email's start.
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
    with locks.fast_path(keys, ttl=lease + budget) as mine:
        for key in keys:
            if key not in mine:
                outcomes[key] = Outcome(key, "retry", detail="locked by another worker", retry_in=1.0)
        to_send = _claim([p for k, p in batch.items() if k in mine], lease, db, outcomes)
        _send_all(to_send, lease, db, began + budget, outcomes)
    return [outcomes[p["key"]] for p in payloads]


def _claim(batch: list[dict[str, Any]], lease: float, db: str, outcomes: dict[str, Outcome]) -> list[_Item]:
    """The batch's one transaction: record, claim, and settle what cannot be sent.
    Returns the items to send."""
    if not batch:
        return []
    with transaction.atomic(using=db):
        pks = Notification.objects.record_many(batch, db)
        claims = SentEmail.objects.claim_many([(p["key"], pks[p["key"]]) for p in batch], owner_name(), lease, db)
        settled: list[Finish] = []
        to_send: list[_Item] = []
        for payload in batch:
            key = payload["key"]
            claim = claims[key]
            if claim.outcome == "busy":
                outcomes[key] = Outcome(key, "retry", detail="claimed by another worker", retry_in=claim.retry_in)
            elif claim.outcome == "done":
                outcomes[key] = Outcome(key, "duplicate", detail=claim.state)
            elif claim.attempts >= int(settings.MAX_ATTEMPTS):
                # Every attempt so far ended with its worker dying mid-send: stop here.
                reason = f"gave up after {claim.attempts} attempts; the last ended without a recorded outcome"
                settled.append(Finish(key, claim.token, ClaimState.FAILED, reason, claim.attempts, claim.ambiguous))
                outcomes[key] = Outcome(key, "failed", detail=reason, attempts=claim.attempts)
            elif claim.ambiguous and settings.AMBIGUOUS == "hold":
                logger.warning("%s: previous holder died mid-send; outcome unknown, held", key)
                reason = "held: a previous send may have reached the mail server; decide in the admin"
                settled.append(Finish(key, claim.token, ClaimState.HELD, reason, claim.attempts, ambiguous=True))
                outcomes[key] = Outcome(key, "held", detail=reason, attempts=claim.attempts)
            else:
                if claim.ambiguous:
                    logger.warning("%s: previous holder died mid-send; outcome unknown, resending", key)
                to_send.append(_Item(payload, claim.token, claim.attempts, claim.ambiguous))
        if settled:
            _check_written(settled, SentEmail.objects.settle(settled, None, db)[0])
        SentEmail.objects.mark_sending([(pks[i.key], i.ambiguous) for i in to_send], db)
    return to_send


# Sending threads per worker process, each with its own mail-server and database
# connection, shared by the batches this process runs (created after the fork).
_lanes: tuple[int, ThreadPoolExecutor] | None = None
_lanes_lock = threading.Lock()


def _executor(size: int) -> ThreadPoolExecutor:
    global _lanes
    with _lanes_lock:
        if _lanes is None or _lanes[0] != os.getpid() or _lanes[1]._max_workers < size:
            _lanes = (os.getpid(), ThreadPoolExecutor(max_workers=size, thread_name_prefix="notifications-send"))
        return _lanes[1]


def _send_all(to_send: list[_Item], lease: float, db: str, deadline: float, outcomes: dict[str, Outcome]) -> None:
    """Send the claimed items over ``NOTIFICATIONS_SEND_CONCURRENCY`` connections at once,
    each lane taking the next item when its last is recorded (as ``_send_lane`` says).
    The round trips to the mail server and the database are waits, so lanes overlap
    them, and a slow email holds up only its own lane."""
    lanes = max(1, min(len(to_send), int(settings.SEND_CONCURRENCY)))
    queue = deque(to_send)
    unreachable = threading.Event()
    if lanes == 1:
        _send_lane(queue, lease, db, deadline, outcomes, unreachable)
        return
    pool = _executor(lanes)
    futures = [pool.submit(_send_lane, queue, lease, db, deadline, outcomes, unreachable) for _ in range(lanes)]
    errors = [f.exception() for f in futures]  # waits for every lane
    for error in errors:
        if error is not None:
            raise error


def _next(queue: deque[_Item]) -> _Item | None:
    try:
        return queue.popleft()  # atomic: lanes share the queue
    except IndexError:
        return None


def _send_lane(
    queue: deque[_Item],
    lease: float,
    db: str,
    deadline: float,
    outcomes: dict[str, Outcome],
    unreachable: threading.Event,
) -> None:
    """Send items one by one over this thread's connection. Committed before each send:
    that item's ``send_started_at``, in the same statement that records the previous
    item's outcome, so a batch costs one database round trip per email and the window
    of unknown outcome stays one email wide. Once the mail server cannot be reached (by
    any lane), or the time budget is spent, what is left is released untried."""
    settled: list[Finish] = []
    last: Outcome | None = None
    while True:
        if unreachable.is_set() or time.monotonic() > deadline:
            why = "the mail server is unreachable" if unreachable.is_set() else "this batch's time budget ran out"
            reason = f"not attempted: {why}"
            retry_in = last.retry_in if last is not None and unreachable.is_set() else 0.0
            while (left := _next(queue)) is not None:
                settled.append(Finish(left.key, left.token, ClaimState.RELEASED, reason, left.attempts))
                outcomes[left.key] = Outcome(left.key, "retry", detail=reason, retry_in=retry_in)
        item = _next(queue)
        start = item.start(lease) if item is not None else None
        written, started = _settle(settled, start, db)
        _check_written(settled, written)
        if last is not None and last.status == "sent":
            crash_point("after_record", last.key)
        settled, last = [], None
        if item is None:
            return
        if not started:  # taken over since the claim: not ours to send
            outcomes[item.key] = Outcome(item.key, "retry", detail="taken over by another worker", retry_in=1.0)
            continue
        # Committed: send_started_at is set. From here to the outcome record is the window.
        crash_point("before_send", item.key)
        finish, last, reachable = _attempt(item)
        outcomes[item.key] = last
        settled = [finish]
        if not reachable:
            unreachable.set()


def _attempt(item: _Item) -> tuple[Finish, Outcome, bool]:
    """One SMTP transaction: what to record, what to report, and whether the mail
    server is reachable (False: do not try the rest of the batch now)."""
    key, attempts = item.key, item.attempts + 1
    try:
        response = send_email(build_message(item.payload))
    except PermanentDeliveryError as exc:
        finish = Finish(key, item.token, ClaimState.FAILED, str(exc), attempts)
        return finish, Outcome(key, "failed", detail=str(exc), attempts=attempts), True
    except AmbiguousDeliveryError as exc:
        return (*_after_transient(item, exc, ambiguous=True), True)
    except TransientDeliveryError as exc:
        finish, outcome = _after_transient(item, exc, ambiguous=False)
        return finish, outcome, not isinstance(exc, MailServerUnreachable)
    crash_point("after_reply", key)
    finish = Finish(key, item.token, ClaimState.SENT, response, attempts)
    return finish, Outcome(key, "sent", detail=response, attempts=attempts), True


def _after_transient(item: _Item, exc: Exception, ambiguous: bool) -> tuple[Finish, Outcome]:
    key, attempts = item.key, item.attempts + 1
    reason = f"attempt {attempts}: {exc}"
    if ambiguous and settings.AMBIGUOUS == "hold":
        finish = Finish(key, item.token, ClaimState.HELD, f"held: {reason}", attempts, ambiguous=True)
        return finish, Outcome(key, "held", detail=reason, attempts=attempts)
    if attempts >= int(settings.MAX_ATTEMPTS):
        final = f"gave up after {attempts} attempts; last error: {exc}"
        finish = Finish(key, item.token, ClaimState.FAILED, final, attempts, ambiguous=ambiguous)
        return finish, Outcome(key, "failed", detail=final, attempts=attempts)
    finish = Finish(key, item.token, ClaimState.RELEASED, reason, attempts, ambiguous=ambiguous)
    return finish, Outcome(key, "retry", detail=reason, retry_in=_retry_delay(attempts), attempts=attempts)


def _check_written(settled: Sequence[Finish], written: set[str]) -> None:
    for finish in settled:
        if finish.key not in written:
            logger.error(
                "%s: claim lost (token %s is stale); outcome %s not recorded", finish.key, finish.token, finish.state
            )


def _settle(settled: Sequence[Finish], start: Start | None, db: str) -> tuple[set[str], bool]:
    """``SentEmail.objects.settle`` in autocommit, retried on database errors.

    After the mail server answered, losing this write would turn a known outcome into
    an ambiguous one, so it is retried (reconnecting) before giving up.
    """
    for attempt in range(RECORD_RETRIES):
        try:
            return SentEmail.objects.settle(settled, start, db)
        except DatabaseError:
            if attempt == RECORD_RETRIES - 1:
                raise
            close_old_connections()
            connections[db].close()
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")
