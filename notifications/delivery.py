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
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.db import DatabaseError, close_old_connections, transaction
from django.db.models import F
from django.db.models.functions import Now

from . import locks
from .conf import settings
from .exceptions import (
    AmbiguousDeliveryError,
    ClaimBusy,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from .faults import crash_point
from .models import ClaimState, Notification, SentEmail, Status, message_id_for

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


# One mail-server connection per worker process, reused across emails: connecting and
# saying EHLO costs more than sending a small message. (pid, backend) so that a forked
# child never writes to its parent's socket.
_connection: tuple[int, Any] | None = None


def _drop_connection() -> None:
    global _connection
    if _connection is not None and _connection[0] == os.getpid():
        try:
            _connection[1].close()
        except Exception:  # closing a broken connection must not mask the outcome
            pass
    _connection = None


def _reusable(backend: Any) -> bool:
    """A NOOP on the open connection: a server that timed it out answers no more, and
    finding that out before MAIL FROM keeps the failure on the safe side (nothing sent)."""
    smtp = getattr(backend, "connection", None)
    if smtp is None:  # backends without a socket (console, locmem, most HTTP APIs)
        return True
    try:
        return int(smtp.noop()[0]) == 250
    except Exception:
        return False


def _open_connection() -> Any:
    global _connection
    if _connection is not None and _connection[0] == os.getpid() and _reusable(_connection[1]):
        return _connection[1]
    _drop_connection()
    backend = get_connection(fail_silently=False)
    try:
        backend.open()
    except smtplib.SMTPResponseException as exc:
        raise _classify_reply(exc.smtp_code, exc.smtp_error) from exc
    except Exception as exc:
        raise TransientDeliveryError(f"connect: {exc!r}") from exc
    _connection = (os.getpid(), backend)
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


def _notify_update(pk: int, **fields: Any) -> None:
    Notification.objects.using(settings.DATABASE).filter(pk=pk).update(updated_at=Now(), **fields)


def deliver(payload: dict[str, Any]) -> Outcome:
    """Deliver one notification at most once per key (see the module docstring).

    Returns the outcome; raises ``ClaimBusy`` when another worker holds the claim and
    ``TransientDeliveryError`` when the task should retry after ``Outcome.retry_in``.
    Database errors propagate: the message is retried and nothing was sent.
    """
    key = payload["key"]
    db = settings.DATABASE
    lease = float(settings.CLAIM_LEASE)
    crash_point("before_claim", key)
    with locks.fast_path(key, ttl=lease) as mine:
        if not mine:
            raise ClaimBusy(key, retry_in=1.0)
        with transaction.atomic(using=db):
            pk = Notification.objects.record(payload, db)
            claim = SentEmail.objects.claim(key, pk, owner_name(), lease, db)
            if claim.outcome == "busy":
                raise ClaimBusy(key, claim.retry_in)
            if claim.outcome == "done":
                return Outcome(key, "duplicate", detail=claim.state)
            if claim.attempts >= int(settings.MAX_ATTEMPTS):
                # Every attempt so far ended with its worker dying mid-send: stop here.
                reason = f"gave up after {claim.attempts} attempts; the last ended without a recorded outcome"
                SentEmail.objects.finish(key, claim.token, ClaimState.FAILED, reason, db, ambiguous=claim.ambiguous)
                _notify_update(pk, status=Status.FAILED, last_error=reason)
                return Outcome(key, "failed", detail=reason, attempts=claim.attempts)
            if claim.ambiguous:
                logger.warning("%s: previous holder died mid-send; outcome unknown", key)
                if settings.AMBIGUOUS == "hold":
                    reason = "held: a previous send may have reached the mail server; decide in the admin"
                    SentEmail.objects.finish(key, claim.token, ClaimState.HELD, reason, db, ambiguous=True)
                    _notify_update(
                        pk, status=Status.AMBIGUOUS, last_error=reason, ambiguous_count=F("ambiguous_count") + 1
                    )
                    return Outcome(key, "held", detail=reason)
                _notify_update(pk, ambiguous_count=F("ambiguous_count") + 1)
            if not SentEmail.objects.start_send(key, claim.token, lease, message_id_for(key), db):
                raise ClaimBusy(key, retry_in=1.0)  # taken over since the claim: not ours to send
            _notify_update(pk, status=Status.SENDING, attempts=claim.attempts + 1)
        attempts = claim.attempts + 1
        # Committed: send_started_at is set. From here to the outcome record is the window.
        crash_point("before_send", key)
        try:
            response = send_email(build_message(payload))
        except PermanentDeliveryError as exc:
            _record(key, claim.token, pk, ClaimState.FAILED, str(exc), attempts)
            return Outcome(key, "failed", detail=str(exc), attempts=attempts)
        except AmbiguousDeliveryError as exc:
            return _after_transient(key, claim.token, pk, exc, attempts, ambiguous=True)
        except TransientDeliveryError as exc:
            return _after_transient(key, claim.token, pk, exc, attempts, ambiguous=False)
        crash_point("after_reply", key)
        _record(key, claim.token, pk, ClaimState.SENT, response, attempts)
        crash_point("after_record", key)
        return Outcome(key, "sent", detail=response, attempts=attempts)


def _after_transient(key: str, token: int, pk: int, exc: Exception, attempts: int, ambiguous: bool) -> Outcome:
    reason = f"attempt {attempts}: {exc}"
    if ambiguous and settings.AMBIGUOUS == "hold":
        _record(key, token, pk, ClaimState.HELD, f"held: {reason}", attempts, ambiguous=True)
        return Outcome(key, "held", detail=reason, attempts=attempts)
    if attempts >= int(settings.MAX_ATTEMPTS):
        final = f"gave up after {attempts} attempts; last error: {exc}"
        _record(key, token, pk, ClaimState.FAILED, final, attempts, ambiguous=ambiguous)
        return Outcome(key, "failed", detail=final, attempts=attempts)
    _record(key, token, pk, ClaimState.RELEASED, reason, attempts, ambiguous=ambiguous)
    return Outcome(key, "retry", detail=reason, retry_in=_retry_delay(attempts), attempts=attempts)


_NOTIFICATION_STATUS: dict[str, Status] = {
    ClaimState.SENT: Status.SENT,
    ClaimState.FAILED: Status.FAILED,
    ClaimState.HELD: Status.AMBIGUOUS,
    ClaimState.RELEASED: Status.RETRYING,
}


def _record(key: str, token: int, pk: int, state: str, response: str, attempts: int, ambiguous: bool = False) -> None:
    """Write the outcome under the fencing token.

    After the mail server answered, losing this write would turn a known outcome into an
    ambiguous one, so database errors are retried here (reconnecting) before giving up.
    """
    db = settings.DATABASE
    for attempt in range(RECORD_RETRIES):
        try:
            with transaction.atomic(using=db):
                if not SentEmail.objects.finish(key, token, state, response, db, ambiguous=ambiguous):
                    logger.error("%s: claim lost (token %s is stale); outcome %s not recorded", key, token, state)
                    return
                fields: dict[str, Any] = {"status": _NOTIFICATION_STATUS[state], "attempts": attempts}
                if state == ClaimState.SENT:
                    fields.update(sent_at=Now(), last_error="")
                else:
                    fields["last_error"] = response[:2000]
                if ambiguous:
                    fields["ambiguous_count"] = F("ambiguous_count") + 1
                _notify_update(pk, **fields)
            return
        except DatabaseError:
            if attempt == RECORD_RETRIES - 1:
                raise
            close_old_connections()
            from django.db import connections

            connections[db].close()
            time.sleep(0.2 * (attempt + 1))
