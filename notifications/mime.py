"""The bytes of an email as Django's SMTP backend sends them, written directly.

Django builds each email as a tree of ``email.mime`` objects, serialises it with
``email.generator``, and its SMTP backend parses the sender and every recipient again
for the envelope: a quarter to half a millisecond of worker CPU per email, most of
what a worker spends on one. For the emails ``mail.build_message`` makes (one recipient, a
text body, perhaps one HTML alternative, a few headers) this module writes the same
bytes itself and keeps the envelope addresses it has worked out. They must be byte for
byte what Django sends (the Date header and the MIME boundary come from the same
sources as Django's): an email that reads differently from one sent through Django is a
second kind of email. So whatever is not plainly one of those few shapes (another
charset, a body Django would send quoted-printable, attachments, cc, a header it would
encode or fold in a way not written out here) is handed to Django's own code, and an
email this module cannot build goes to Django whole, which builds it or raises what it
raises. ``tests/test_mime.py`` compares both on generated emails.
"""

from __future__ import annotations

import functools
import re
import smtplib
from email.errors import MessageError
from email.generator import BytesGenerator
from email.policy import compat32
from email.utils import formatdate
from typing import Any, NamedTuple

import django
from django.conf import settings as django_settings
from django.core.mail import EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.mail.message import RFC5322_EMAIL_LINE_LENGTH_LIMIT, forbid_multi_line_headers, sanitize_address

from .conf import settings

# The Django whose email code these bytes are copied from (6.0 builds emails another
# way): with any other, every email goes through Django.
WRITTEN_FOR = (5, 2)
# The only charset written here; Django sends utf-8 text as 7bit or 8bit (unless a line
# is too long, then quoted-printable, which is left to it).
CHARSET = "utf-8"
# What Django's generator folds headers with: compat32, 78 columns, CRLF.
_POLICY = compat32.clone(linesep="\r\n")
_COLUMNS = 78
# Headers the message itself sets or structures; an email whose extra headers name one
# goes through Django.
_OWN_HEADERS = frozenset(
    {"from", "to", "cc", "reply-to", "date", "subject", "mime-version", "content-type", "content-transfer-encoding"}
)
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII but ':'
# An address that Django's sanitize_address gives back as it is: a dot-atom local part
# and a domain of ASCII labels short enough for the IDNA codec to leave them alone.
_BARE_ADDRESS = re.compile(r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*")
_LINE_END = re.compile(rb"\r\n|\r|\n")  # email.generator's NLCRE
# A MIME boundary is 15 "=", 19 digits and "==": text without 15 "=" cannot contain one.
_BOUNDARY_RUN = b"=" * 15
# How many header lines and envelope addresses are kept (sender, subject and recipient
# lines repeat across emails), and the longest header value kept: a few MB at most.
CACHE_SIZE = 4096
CACHED_VALUE_LENGTH = 256


class Prepared(NamedTuple):
    """One email as the SMTP transaction carries it."""

    from_email: str  # the envelope sender (MAIL FROM)
    recipients: list[str]  # the envelope recipients (RCPT TO)
    data: bytes  # the message, CRLF line endings


def send_messages(connection: Any, message: EmailMultiAlternatives) -> Any:
    """What ``connection.send_messages([message])`` returns and raises. Through Django's
    SMTP backend (or a subclass that keeps its ``send_messages`` and ``_send``), with
    ``NOTIFICATIONS_FAST_MIME`` on, the email goes as the bytes ``prepare`` writes, if it
    writes them; every other backend, and every email it does not write, gets ``message``
    itself."""
    prepared = prepare(message) if settings.FAST_MIME and sends_bytes(connection) else None
    if prepared is None:
        return connection.send_messages([message])
    # Django's EmailBackend.send_messages and _send for one email (Django 5.2), with the
    # envelope and the bytes from prepare(): the same lock, open, close and fail_silently.
    with connection._lock:
        new_conn_created = connection.open()
        if not connection.connection or new_conn_created is None:
            return 0
        try:
            connection.connection.sendmail(prepared.from_email, prepared.recipients, prepared.data)
        except smtplib.SMTPException:
            if not connection.fail_silently:
                raise
            return 0
        finally:
            if new_conn_created:
                connection.close()
    return 1


def sends_bytes(connection: Any) -> bool:
    """Whether ``connection`` is Django's SMTP backend sending as Django's does. A
    subclass that changes how an email is sent may read the message object, so it gets
    one."""
    kind = type(connection)
    return (
        isinstance(connection, SMTPBackend)
        and kind.send_messages is SMTPBackend.send_messages
        and kind._send is SMTPBackend._send  # type: ignore[attr-defined]
    )


# What building an email can raise (a header with a line break, text that is not UTF-8,
# an address the parser refuses, an object that is no text); anything else (a task's
# time limit, say) is not caught here.
_REFUSALS = (ValueError, TypeError, AttributeError, LookupError, MessageError)


def prepare(message: EmailMultiAlternatives) -> Prepared | None:
    """The envelope and bytes Django's SMTP backend would send for ``message`` (but for
    the Date header's moment and the MIME boundary's random digits), or None when this
    module does not write that email: Django then builds it, or raises for it."""
    try:
        return _prepare(message)
    except _REFUSALS:  # whatever Django makes of it, it makes of it itself
        return None


def _prepare(message: EmailMultiAlternatives) -> Prepared | None:
    encoding = message.encoding or django_settings.DEFAULT_CHARSET
    if type(message) is not EmailMultiAlternatives or encoding != CHARSET or django.VERSION[:2] != WRITTEN_FOR:
        return None
    if message.cc or message.bcc or message.reply_to or message.attachments or len(message.to) != 1:
        return None
    if message.content_subtype != "plain" or getattr(message, "alternative_subtype", None) != "alternative":
        return None
    to, sender, subject, body = message.to[0], message.from_email, message.subject, message.body
    if not (type(to) is str and to and type(sender) is str and type(subject) is str and type(body) is str):
        return None
    html: str | None = None
    if message.alternatives:
        [(content, mimetype)] = message.alternatives  # more than one: ValueError, so Django's
        if mimetype != "text/html" or type(content) is not str:
            return None
        html = content
    extra = []
    named_id = False
    for name, value in message.extra_headers.items():
        if type(name) is not str or type(value) is not str or not _HEADER_NAME.fullmatch(name):
            return None
        lowered = name.lower()
        if lowered in _OWN_HEADERS:
            return None
        named_id = named_id or lowered == "message-id"
        extra.append(_header(name, value))
    if not named_id:  # Django would make one up
        return None
    envelope_from, envelope_to = envelope_address(sender, encoding), envelope_address(to, encoding)

    text = _body(body)
    if text is None:
        return None
    headers = [
        _kept_header("Subject", subject),
        _kept_header("From", sender),
        _kept_header("To", to),
        _header("Date", formatdate(localtime=django_settings.EMAIL_USE_LOCALTIME)),
        *extra,
        b"\r\n",
    ]
    if html is None:
        return Prepared(envelope_from, [envelope_to], b"".join([_part_headers(b"plain", text[0]), *headers, text[1]]))

    alternative = _body(html)
    if alternative is None:
        return None
    texts = ((b"plain", text), (b"html", alternative)) if body else ((b"html", alternative),)
    parts = [_part_headers(subtype, cte) + b"\r\n" + data for subtype, (cte, data) in texts]
    # email.generator's own boundary, drawn as Django's flatten() draws it; it only has
    # to look at the parts when they could contain one.
    seen = b"\r\n".join(parts) if any(_BOUNDARY_RUN in part for part in parts) else None
    boundary = BytesGenerator._make_boundary(seen).encode("ascii")  # type: ignore[attr-defined]
    return Prepared(
        envelope_from,
        [envelope_to],
        b"".join(
            [
                b'Content-Type: multipart/alternative;\r\n boundary="' + boundary + b'"\r\n',
                b"MIME-Version: 1.0\r\n",
                *headers,
                b"--" + boundary + b"\r\n",
                (b"\r\n--" + boundary + b"\r\n").join(parts),
                b"\r\n--" + boundary + b"--\r\n",
            ]
        ),
    )


def _body(text: str) -> tuple[bytes, bytes] | None:
    """The Content-Transfer-Encoding and the bytes of one text part as Django's
    SafeMIMEText writes them: UTF-8 with CRLF line endings, 7bit or 8bit; None when
    Django would send it quoted-printable."""
    data = text.encode(CHARSET)
    # Django goes quoted-printable when a line of str.splitlines() is longer than the
    # limit; those lines are never longer than the CR/LF lines of the bytes.
    limit = RFC5322_EMAIL_LINE_LENGTH_LIMIT
    if len(data) > limit and max(map(len, data.splitlines())) > limit:
        return None
    if b"\r" in data:
        data = _LINE_END.sub(b"\r\n", data)
    elif b"\n" in data:
        data = data.replace(b"\n", b"\r\n")
    return (b"7bit" if data.isascii() else b"8bit"), data


def _part_headers(subtype: bytes, cte: bytes) -> bytes:
    """A text part's own headers, in SafeMIMEText's order."""
    return (
        b"Content-Type: text/" + subtype + b'; charset="utf-8"\r\nMIME-Version: 1.0\r\n'
        b"Content-Transfer-Encoding: " + cte + b"\r\n"
    )


def _header(name: str, value: str) -> bytes:
    """The header line ``name: value`` as Django writes it: ``forbid_multi_line_headers``
    (which encodes non-ASCII text, and the subject through ``email.header``), then
    compat32's folding at 78 columns. Two cases are written out, the rest done by those
    functions themselves: printable ASCII without surrounding spaces that fits on one
    line is left as it is, and such a value without any space that does not fit (not a
    subject, which is folded twice) goes whole on a continuation line."""
    if value and value.isascii() and value.isprintable() and value[0] != " " and value[-1] != " ":
        if len(name) + 2 + len(value) <= _COLUMNS:
            return f"{name}: {value}\r\n".encode("ascii")
        if " " not in value and name.lower() != "subject":
            return f"{name}: \r\n {value}\r\n".encode("ascii")
    name, folded = forbid_multi_line_headers(name, value, CHARSET)
    return _POLICY.fold_binary(name, folded)


_repeated_header = functools.lru_cache(maxsize=CACHE_SIZE)(_header)


def _kept_header(name: str, value: str) -> bytes:
    """``_header`` for the values that repeat from one email to the next, kept when short."""
    return _repeated_header(name, value) if len(value) <= CACHED_VALUE_LENGTH else _header(name, value)


def envelope_address(address: str, encoding: str) -> str:
    """``sanitize_address(address, encoding)``, as Django's SMTP backend computes the
    envelope: a bare ASCII address as it is, any other kept once worked out."""
    if _BARE_ADDRESS.fullmatch(address):
        return address
    return _sanitized(address, encoding)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _sanitized(address: str, encoding: str) -> str:
    return str(sanitize_address(address, encoding))
