"""The mail server's side of a delivery: build the email, keep one reused connection
per sending thread, hand the email over through Django's email backend, and say what a
failure means for it.

What a failure means depends on how far the SMTP transaction got, so with Django's
SMTP backend the connection is watched: an error before the message's final line was
written cannot have delivered anything (the connection is opened again and the email
tried once more at once, or the server counts as unreachable); an error after it, with
no reply, is the one window where the outcome is unknown (ambiguous). A reply code is
definitive wherever it comes: 4xx transient, 5xx permanent, except the replies that are
about the server or its configuration rather than the email (authentication, closing
down), which never fail an email for good. Other backends (an HTTP API, the console)
cannot be watched: any error of theirs counts as ambiguous.
"""

from __future__ import annotations

import os
import smtplib
import threading
import time
from typing import Any

from django.conf import settings as django_settings
from django.core.mail import EmailMultiAlternatives, get_connection

from . import metrics
from .exceptions import (
    AmbiguousDeliveryError,
    MailServerUnreachable,
    PermanentDeliveryError,
    TransientDeliveryError,
    UnbuildableEmail,
)
from .models import message_id_for

# Replies that describe the server or our login, not the email: a wrong password or a
# server going down fails every email alike, and must not fail any of them for good.
SERVER_REPLIES = frozenset({421, 454, 530, 534, 535, 538})

# A connection used this recently is taken as open without asking: mail servers drop
# idle clients after minutes, not seconds, and a NOOP per email costs a round trip. If
# it was closed after all, the send finds out before handing anything over, and opens a
# new one.
FRESH_SECONDS = 1.0


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


class _Watch:
    """How far the current SMTP transaction got, told by the connection itself: wraps
    the ``smtplib.SMTP`` instance's own ``sendmail``, ``send`` and ``data``."""

    def __init__(self, smtp: smtplib.SMTP) -> None:
        self.talking = False  # sendmail began: the message was built
        self.handed_over = False  # the message and its final "." were written
        self.reply = ""
        sendmail, send, data = smtp.sendmail, smtp.send, smtp.data

        def watched_sendmail(*args: Any, **kwargs: Any) -> Any:
            self.talking = True
            return sendmail(*args, **kwargs)

        def watched_send(chunk: Any) -> None:
            send(chunk)
            if isinstance(chunk, bytes) and chunk.endswith(b"\r\n.\r\n"):
                self.handed_over = True

        def watched_data(msg: Any) -> tuple[int, bytes]:
            code, text = data(msg)
            self.reply = f"{code} {text.decode('utf-8', 'replace') if isinstance(text, bytes) else text}"
            return code, text

        smtp.sendmail = watched_sendmail  # type: ignore[method-assign]
        smtp.send = watched_send  # type: ignore[method-assign,assignment]
        smtp.data = watched_data  # type: ignore[method-assign]

    def reset(self) -> None:
        self.talking = self.handed_over = False
        self.reply = ""


# One mail-server connection per sending thread, kept with the pid, so that a forked
# child never writes to its parent's socket.
_local = threading.local()


def _held() -> tuple[Any, _Watch | None] | None:
    held = getattr(_local, "connection", None)
    if held is not None and held[0] == os.getpid():
        return held[1], held[2]
    return None


def drop_connection() -> None:
    held = _held()
    if held is not None:
        try:
            held[0].close()
        except Exception:  # closing a broken connection must not mask the outcome
            pass
    _local.connection = None


def _alive(backend: Any) -> bool:
    smtp = getattr(backend, "connection", None)
    if smtp is None:  # backends without a socket (console, locmem, most HTTP APIs)
        return True
    if time.monotonic() - getattr(_local, "last_used", 0.0) < FRESH_SECONDS:
        return True
    try:
        return int(smtp.noop()[0]) == 250
    except Exception:
        return False


def has_connection() -> bool:
    """Whether this thread holds a connection (that may still need its NOOP)."""
    return _held() is not None


def connection() -> Any:
    """This thread's open connection to the mail server, opened (and logged in) if it
    has none, checked with NOOP if it sat idle. Raises ``MailServerUnreachable`` for
    any failure: nothing of any email was sent, so no email's outcome depends on it."""
    held = _held()
    if held is not None and _alive(held[0]):
        return held[0]
    drop_connection()
    backend = get_connection(fail_silently=False)
    try:
        backend.open()
    except smtplib.SMTPResponseException as exc:
        metrics.smtp_connections["failed"].inc()
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        raise MailServerUnreachable(f"connect: {exc.smtp_code} {text}".strip()) from exc
    except Exception as exc:
        metrics.smtp_connections["failed"].inc()
        raise MailServerUnreachable(f"connect: {exc!r}") from exc
    metrics.smtp_connections["opened"].inc()
    if getattr(_local, "opened_in", 0) == os.getpid():  # this thread had one before
        metrics.SMTP_RECONNECTS.inc()
    _local.opened_in = os.getpid()
    _local.carried = 0  # emails this connection has handed over
    smtp = getattr(backend, "connection", None)
    watch = _Watch(smtp) if isinstance(smtp, smtplib.SMTP) else None
    _local.connection = (os.getpid(), backend, watch)
    return backend


def send(message: EmailMultiAlternatives) -> str:
    """Hand ``message`` to the mail server over this thread's connection; return the
    server's reply. Raises a ``DeliveryError`` that says what the failure means (see
    the module docstring); after any failure the connection is dropped."""
    for again in (False, True):
        backend = connection()
        held = _held()
        watch = held[1] if held is not None else None
        if watch is not None:
            watch.reset()
        try:
            sent = backend.send_messages([message])
        except smtplib.SMTPRecipientsRefused as exc:
            drop_connection()
            code, reply = next(iter(exc.recipients.values()))
            raise _classify(code, reply, handed_over=False) from exc
        except smtplib.SMTPResponseException as exc:
            drop_connection()
            handed_over = watch is None or watch.handed_over
            if not again and not handed_over and exc.smtp_code == 421:
                continue  # the server closed this connection before the email: a new one
            raise _classify(exc.smtp_code, exc.smtp_error, handed_over) from exc
        except Exception as exc:
            drop_connection()
            if watch is None or watch.handed_over:
                raise AmbiguousDeliveryError(f"connection lost during the SMTP transaction: {exc!r}") from exc
            if not watch.talking:  # failed before the first SMTP command: the email itself
                raise UnbuildableEmail(f"the email could not be built: {exc!r}") from exc
            if not again:
                continue  # nothing was handed over: a reused connection had died
            raise MailServerUnreachable(f"connection lost before the email was handed over: {exc!r}") from exc
        if sent != 1:
            drop_connection()
            raise AmbiguousDeliveryError("the email backend reported no message sent")
        _local.last_used = time.monotonic()
        if getattr(_local, "carried", 0):
            metrics.SMTP_REUSES.inc()
        _local.carried = getattr(_local, "carried", 0) + 1
        return (watch.reply if watch is not None and watch.reply else "") or "250 accepted"
    raise AssertionError("unreachable")


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _classify(code: int, reply: bytes | str, handed_over: bool) -> Exception:
    """What a reply means for the email. Before the email was handed over, a reply about
    the server (closing, authentication) is no verdict on the email; after it, every
    reply is one."""
    reason = f"{code} {_text(reply)}".strip()
    if code in SERVER_REPLIES and not handed_over:
        return MailServerUnreachable(reason)
    if 500 <= code < 600:
        return PermanentDeliveryError(reason)
    return TransientDeliveryError(reason)
