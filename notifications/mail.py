"""The mail server's side of a delivery: build the email, keep one reused connection
per sending thread and named email backend (``backends.py``), hand the email over
through that Django email backend, and say what a failure means for it.

What a failure means depends on how far the SMTP transaction got, so with Django's
SMTP backend the connection is watched: an error before the message's final line was
written cannot have delivered anything (the connection is opened again and the email
tried once more at once, or the server counts as unreachable); an error after it, with
no reply, is the one window where the outcome is unknown (ambiguous). A reply code is
definitive wherever it comes: 4xx transient, 5xx permanent, except the replies that are
about the server or its configuration rather than the email (authentication, closing
down), which never fail an email for good. Other backends (an HTTP API, the console)
cannot be watched: any error of theirs counts as ambiguous. Through Django's SMTP
backend the email goes as the bytes ``mime.py`` writes (the same Django would send).
"""

from __future__ import annotations

import hashlib
import os
import smtplib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.mail import EmailMultiAlternatives, get_connection

from . import backends, metrics, mime
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
    """The email for a payload; its headers are a pure function of the key (and of the
    backend it goes through: ``IDEMPOTENCY_HEADER``, see ``idempotency_value``)."""
    key = payload["key"]
    headers = {"Message-ID": message_id_for(key), "X-Notification-Key": key}
    try:
        backend = backends.get(payload.get("backend") or None)
    except KeyError:  # connection() refuses it before any email is built
        backend = None
    if backend is not None and backend.idempotency_header and backend.idempotency_in == "email":
        headers[backend.idempotency_header] = idempotency_value(key)
    message = EmailMultiAlternatives(
        subject=payload["subject"],
        body=payload["body"],
        from_email=payload.get("from_email") or django_settings.DEFAULT_FROM_EMAIL,
        to=[payload["to"]],
        headers=headers,
    )
    if payload.get("html_body"):
        message.attach_alternative(payload["html_body"], "text/html")
    return message


# Providers take idempotency keys of limited length and character set (Resend: 1 to 256
# characters); a key outside them is passed as its digest, the same on every send.
IDEMPOTENCY_MAX_LENGTH = 256


def idempotency_value(key: str) -> str:
    """What a provider is given as ``key``'s idempotency key: the key itself, or, when it
    is longer than ``IDEMPOTENCY_MAX_LENGTH`` or not printable ASCII, its SHA-256 hex digest."""
    if len(key) <= IDEMPOTENCY_MAX_LENGTH and key.isascii() and key.isprintable():
        return key
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


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


@dataclass
class _Held:
    """One open connection of this thread: the backend it was built for (and from what
    configuration), and how it has been used."""

    pid: int
    connection: Any  # the Django email backend instance
    watch: _Watch | None
    built_from: tuple[str, str]  # (path, options) it was made with
    last_used: float = 0.0
    carried: int = 0  # emails it has handed over


# One connection per sending thread and email backend, kept with the pid, so that a
# forked child never writes to its parent's socket.
_local = threading.local()


def _connections() -> dict[str, _Held]:
    held: dict[str, _Held] | None = getattr(_local, "connections", None)
    if held is None:
        held = _local.connections = {}
        _local.opened = set()  # backends this thread has had a connection to (for the reconnect count)
    return held


def _backend(name: str | None) -> backends.Backend:
    """The configured backend ``name``; one this process does not know is a mail server it
    cannot reach: nothing is sent, and the email waits (no attempt) until it is configured."""
    try:
        return backends.get(name)
    except KeyError:
        raise MailServerUnreachable(
            f"backend {name!r} is not in this worker's NOTIFICATIONS_BACKENDS ({', '.join(backends.names())})"
        ) from None


def _built_from(backend: backends.Backend) -> tuple[str, str]:
    return backend.path, repr(sorted(backend.options.items()))


def _held(name: str) -> _Held | None:
    held = _connections().get(name)
    if held is not None and held.pid == os.getpid():
        return held
    return None


def drop_connection(backend_name: str | None = None) -> None:
    """Close this thread's connection to ``backend_name`` (None: to every backend)."""
    held = _connections()
    for name in [backend_name] if backend_name is not None else list(held):
        found = held.pop(name, None)
        if found is not None and found.pid == os.getpid():
            try:
                found.connection.close()
            except Exception:  # closing a broken connection must not mask the outcome
                pass


def _alive(held: _Held) -> bool:
    smtp = getattr(held.connection, "connection", None)
    if smtp is None:  # backends without a socket (console, locmem, most HTTP APIs)
        return True
    if time.monotonic() - held.last_used < FRESH_SECONDS:
        return True
    try:
        return int(smtp.noop()[0]) == 250
    except Exception:
        return False


def has_connection(backend_name: str | None = None) -> bool:
    """Whether this thread holds a connection to ``backend_name`` (None: the default
    backend) that may still need its NOOP."""
    try:
        name = backends.get(backend_name).name
    except KeyError:
        return False
    return _held(name) is not None


def connection(backend_name: str | None = None) -> Any:
    """This thread's open connection through the email backend ``backend_name`` (None:
    the default), opened (and logged in) if it has none, checked with NOOP if it sat
    idle. Raises ``MailServerUnreachable`` for any failure, and for a backend name this
    process is not configured with: nothing of any email was sent, so no email's
    outcome depends on it."""
    backend = _backend(backend_name)
    held = _held(backend.name)
    if held is not None and held.built_from == _built_from(backend) and _alive(held):
        return held.connection
    drop_connection(backend.name)
    try:
        opened = get_connection(backend.path, fail_silently=False, **backend.options)
        opened.open()
    except smtplib.SMTPResponseException as exc:
        metrics.smtp_connections["failed"].inc()
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        raise MailServerUnreachable(f"{backend.name}: connect: {exc.smtp_code} {text}".strip()) from exc
    except Exception as exc:
        metrics.smtp_connections["failed"].inc()
        raise MailServerUnreachable(f"{backend.name}: connect: {exc!r}") from exc
    metrics.smtp_connections["opened"].inc()
    connections = _connections()
    if backend.name in _local.opened:  # this thread had one before
        metrics.SMTP_RECONNECTS.inc()
    _local.opened.add(backend.name)
    smtp = getattr(opened, "connection", None)
    watch = _Watch(smtp) if isinstance(smtp, smtplib.SMTP) else None
    connections[backend.name] = _Held(os.getpid(), opened, watch, _built_from(backend))
    return opened


@contextmanager
def _request_header(backend: backends.Backend, held: _Held, message: EmailMultiAlternatives) -> Iterator[None]:
    """With ``IDEMPOTENCY_IN = "request"``: the key as a header of the HTTP request the
    backend makes for this one email. django-anymail's requests-based backends make every
    request through ``self.session`` (a ``requests.Session`` opened by ``open()``), whose
    headers go on each request; this thread's connection sends one email at a time, so
    the header is set for it and taken off after."""
    if not backend.idempotency_header or backend.idempotency_in != "request":
        yield
        return
    headers = getattr(getattr(held.connection, "session", None), "headers", None)
    if headers is None:
        raise MailServerUnreachable(
            f"{backend.name}: IDEMPOTENCY_IN is 'request' but {backend.path} has no HTTP session "
            "(a django-anymail requests-based backend has one once opened)"
        )
    headers[backend.idempotency_header] = idempotency_value(str(message.extra_headers["X-Notification-Key"]))
    try:
        yield
    finally:
        headers.pop(backend.idempotency_header, None)


def send(message: EmailMultiAlternatives, backend_name: str | None = None) -> str:
    """Hand ``message`` to the mail server through the email backend ``backend_name``
    (None: the default) over this thread's connection; return the server's reply.
    Raises a ``DeliveryError`` that says what the failure means (see the module
    docstring); after any failure the connection is dropped."""
    backend = _backend(backend_name)
    for again in (False, True):
        opened = connection(backend.name)
        held = _held(backend.name)
        assert held is not None  # connection() just stored it
        watch = held.watch
        if watch is not None:
            watch.reset()
        try:
            with _request_header(backend, held, message):
                sent = mime.send_messages(opened, message)
        except MailServerUnreachable:
            drop_connection(backend.name)
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            drop_connection(backend.name)
            code, reply = next(iter(exc.recipients.values()))
            raise _classify(code, reply, handed_over=False) from exc
        except smtplib.SMTPResponseException as exc:
            drop_connection(backend.name)
            handed_over = watch is None or watch.handed_over
            if not again and not handed_over and exc.smtp_code == 421:
                continue  # the server closed this connection before the email: a new one
            raise _classify(exc.smtp_code, exc.smtp_error, handed_over) from exc
        except Exception as exc:
            drop_connection(backend.name)
            if watch is None or watch.handed_over:
                raise AmbiguousDeliveryError(f"connection lost during the SMTP transaction: {exc!r}") from exc
            if not watch.talking:  # failed before the first SMTP command: the email itself
                raise UnbuildableEmail(f"the email could not be built: {exc!r}") from exc
            if not again:
                continue  # nothing was handed over: a reused connection had died
            raise MailServerUnreachable(f"connection lost before the email was handed over: {exc!r}") from exc
        if sent != 1:
            drop_connection(backend.name)
            raise AmbiguousDeliveryError("the email backend reported no message sent")
        held.last_used = time.monotonic()
        if held.carried:
            metrics.SMTP_REUSES.inc()
        held.carried += 1
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
