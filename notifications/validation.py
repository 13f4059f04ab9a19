"""Input checks for notify(): every problem raises InvalidNotification naming the field.

Header fields must never carry CR or LF (header injection); addresses must be single,
valid mailboxes that Django's email code can encode; text must be valid Unicode; sizes
are bounded so one call cannot flood the outbox, and a notification must fit in one
broker message.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.headerregistry import Address
from email.utils import getaddresses
from typing import Any, NamedTuple

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.core.mail.message import sanitize_address
from django.core.validators import validate_email
from django.utils import timezone
from django.utils.encoding import punycode

from .conf import settings
from .exceptions import InvalidNotification

MAX_LENGTHS = {"service": 100, "notification_id": 200, "user_id": 200}
MAX_METADATA_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAK = re.compile(r"[\r\n\u2028\u2029\x85]")
# A lone surrogate is not text: it cannot be encoded as UTF-8, so neither PostgreSQL
# nor the mail server could take it.
_SURROGATE = re.compile("[\ud800-\udfff]")
# An escaped NUL in JSON text: \u0000 after an even number of backslashes (an odd
# number means the backslash itself was escaped, and the text is a literal "\u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A number written with an exponent (or text that looks like one: the walk decides).
_EXPONENT = re.compile(r"\d[eE][-+]?\d")
NOT_UNICODE = "is not valid Unicode text (it contains a lone surrogate)"
# An RFC 2047 encoded word: Django sends ASCII header text as it is, and the reader's
# mail program would show "=?utf-8?q?x?=" as "x".
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def _unicode(field: str, text: str) -> None:
    if _SURROGATE.search(text):
        raise InvalidNotification(field, NOT_UNICODE)


def _header_text(field: str, text: str) -> None:
    """Header text that Django sends unencoded (ASCII) must not contain what a mail
    program decodes (non-ASCII text is encoded whole, and arrives as it was)."""
    if text.isascii() and "=?" in text and (found := _ENCODED_WORD.search(text)):
        raise InvalidNotification(
            field, f"contains {found.group()!r}, which mail programs would decode as an encoded word (RFC 2047)"
        )


def identifier(field: str, value: Any) -> str:
    """service / notification_id / user_id: non-empty text (or an int), bounded,
    without control characters or surrounding whitespace; ':' only in user_id, so the
    key splits one way."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidNotification(field, f"must be a string, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise InvalidNotification(field, "must not be empty")
    limit = MAX_LENGTHS[field]
    if len(text) > limit:
        raise InvalidNotification(field, f"is {len(text)} characters long, the limit is {limit}")
    if _CONTROL.search(text) or _LINE_BREAK.search(text):
        raise InvalidNotification(field, "must not contain control characters or line breaks")
    if text != text.strip():
        # The key travels in the X-Notification-Key header, whose surrounding whitespace
        # mail software drops.
        raise InvalidNotification(field, "must not begin or end with whitespace")
    _unicode(field, text)
    if field != "user_id" and ":" in text:
        raise InvalidNotification(field, "must not contain ':' (the key is service:notification_id:user_id)")
    return text


def key(service: str, notification_id: str, user_id: str) -> str:
    """The idempotency key; it travels in the X-Notification-Key header, so it must not
    contain an encoded word (which begins with '=?' in one of the ids)."""
    text = f"{service}:{notification_id}:{user_id}"
    if "=?" in text and text.isascii() and (found := _ENCODED_WORD.search(text)):
        field = next(f for f, v in zip(MAX_LENGTHS, (service, notification_id, user_id), strict=True) if "=?" in v)
        raise InvalidNotification(
            field,
            f"makes the key {text!r} contain {found.group()!r}, which mail programs would decode "
            "as an encoded word (RFC 2047) in its X-Notification-Key header",
        )
    return text


def address(field: str, value: Any, *, required: bool = True) -> str:
    """One mailbox, optionally with a display name: 'a@example.com' or 'Ann <a@example.com>'.

    Returns the normalised form, which is what is stored and sent. Refused: domain
    literals ('a@[10.0.0.1]': they aim the mail server at a host of the caller's
    choosing) and anything Django's email code could not encode when it sends.
    """
    if value is None or value == "":
        if required:
            raise InvalidNotification(field, "an email address is required")
        return ""
    if not isinstance(value, str):
        raise InvalidNotification(field, f"must be a string, got {type(value).__name__}")
    if _LINE_BREAK.search(value) or _CONTROL.search(value):
        raise InvalidNotification(field, "must not contain CR, LF or other control characters")
    _unicode(field, value)
    if len(value) > 320:
        raise InvalidNotification(field, "is longer than 320 characters")
    simple = _SIMPLE_ADDRESS.fullmatch(value)
    if simple is not None:
        try:
            validate_email(simple["spec"])
        except ValidationError:
            pass  # the full checks say what is wrong
        else:
            name = simple["name"]
            if not name:
                return value
            local, domain = simple["spec"].split("@")
            stored = str(Address(display_name=name, username=local, domain=domain))
            if len(stored) <= 320:
                return stored
    return _checked_address(field, value)


# The common address: ASCII words for a display name, a dot-atom local part and a domain
# name. Every check of _checked_address() passes it unchanged but the quoting of the
# display name, which email's header parser (behind those checks) takes a tenth of a
# millisecond to find out.
_SIMPLE_ADDRESS = re.compile(
    r"(?:(?P<name>[A-Za-z0-9.'-]+(?: [A-Za-z0-9.'-]+)*) <)?"
    r"(?P<spec>[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
    r"(?(name)>)"
)


def _checked_address(field: str, value: str) -> str:
    """``address()`` for any text: parsed, and checked as Django's email code will
    encode it."""
    parsed = getaddresses([value])
    if len(parsed) != 1 or not parsed[0][1]:
        raise InvalidNotification(field, f"{value!r} is not a single email address")
    name, spec = parsed[0]
    # Whitespace in a display name does not travel as given (mail parsers trim and fold
    # it, also inside encoded words): one space between words is what arrives.
    name = " ".join(name.split())
    _header_text(field, name)
    if spec.rpartition("@")[2].startswith("["):
        raise InvalidNotification(field, f"{spec!r}: domain literals are not accepted, give a domain name")
    try:
        validate_email(spec)
    except ValidationError:
        raise InvalidNotification(field, f"{spec!r} is not a valid email address") from None
    if spec.count("@") != 1:
        raise InvalidNotification(field, f"{spec!r} is not a valid email address")
    domain = spec.split("@")[1]
    if not domain.isascii():
        _idna(field, domain)
    spec = _as_sent(field, spec)
    # Normalising may quote the display name, so the stored form can be longer.
    stored = str(Address(display_name=name, addr_spec=spec)) if name else spec
    if len(stored) > 320:
        raise InvalidNotification(field, "is longer than 320 characters once its display name is quoted")
    if spec.startswith('"') and not stored.isascii():
        # Django encodes a non-ASCII address header from (name, addr-spec) pairs and
        # takes the quoted local part for a bare one: the header would name a mailbox
        # '"\\"a b\\""', not the one the envelope goes to.
        raise InvalidNotification(
            field, f"{stored!r}: a quoted local part cannot go with non-ASCII text in one address"
        )
    try:
        # What the email backend does with it at send time (IDNA for the domain, an
        # encoded word for the display name): fail here, not in a worker.
        sanitize_address(stored, django_settings.DEFAULT_CHARSET)
    except ValueError as exc:  # UnicodeError (IDNA) is a ValueError
        raise InvalidNotification(field, f"{stored!r} cannot be encoded for sending ({exc})") from None
    return stored


def _as_sent(field: str, spec: str) -> str:
    """The addr-spec as Django's email code rebuilds it: needless quotes dropped
    ('"a"@x' is 'a@x'). Refused when that is no address: '""@x' and '"."@x' would go
    out as '@x' and '.@x', which no mail server takes."""
    try:
        rebuilt = Address(addr_spec=spec).addr_spec
    except ValueError as exc:  # a header defect is one
        raise InvalidNotification(field, f"{spec!r} is not a valid email address ({exc})") from None
    try:
        validate_email(rebuilt)
    except ValidationError:
        raise InvalidNotification(field, f"{spec!r} would be sent as {rebuilt!r}, not a valid address") from None
    return rebuilt


def _idna(field: str, domain: str) -> None:
    """An internationalised domain must survive the IDNA encoding Django's email code
    applies (Python's IDNA 2003 codec): encodable, and naming the same domain once
    encoded ('faße.de' would go out as 'fasse.de', another domain)."""
    try:
        sent = punycode(domain)
    except UnicodeError as exc:
        raise InvalidNotification(field, f"the domain {domain!r} cannot be encoded for sending ({exc})") from None
    if sent.encode("ascii").decode("idna") != domain.lower():
        raise InvalidNotification(field, f"the domain {domain!r} would be sent as {sent!r}, another domain")


def subject(value: Any) -> str:
    """The subject without surrounding whitespace, which a header does not keep (mail
    parsers strip it): what is stored is what arrives."""
    if not isinstance(value, str):
        raise InvalidNotification("subject", f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidNotification("subject", "must not be empty")
    if _LINE_BREAK.search(value) or _CONTROL.search(value):
        raise InvalidNotification("subject", "must not contain CR, LF or other control characters")
    _unicode("subject", value)
    _header_text("subject", value)
    limit = settings.MAX_SUBJECT_LENGTH
    if len(value) > limit:
        raise InvalidNotification("subject", f"is {len(value)} characters long, the limit is {limit}")
    return value.strip()


def body(field: str, value: Any, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidNotification(field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InvalidNotification(field, "must not be empty")
    if "\x00" in value:
        raise InvalidNotification(field, "must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidNotification(field, NOT_UNICODE) from None
    limit = settings.MAX_BODY_BYTES
    if size > limit:
        raise InvalidNotification(field, f"is {size} bytes, the limit is {limit} (NOTIFICATIONS_MAX_BODY_BYTES)")
    # A search for each character: far faster on a long body than one regex class.
    if any(end in value for end in (_ASCII_LINE_ENDS if value.isascii() else _OTHER_LINE_ENDS)):
        _unwrapped_lines(field, value)
    return value


# Characters str.splitlines() ends a line at, besides CR and LF.
_ASCII_LINE_ENDS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e")
_OTHER_LINE_ENDS = (*_ASCII_LINE_ENDS, "\x85", "\u2028", "\u2029")
_CR_LF = re.compile(r"\r\n|\r|\n")
MAX_LINE_BYTES = 998  # RFC 5321 and 5322, without the CRLF


def _unwrapped_lines(field: str, value: str) -> None:
    """Django sends a body as it is (8bit) unless one of its ``splitlines()`` lines is
    longer than the mail line limit, and then quoted-printable, which wraps. Those
    lines also end at form feeds and Unicode line separators, which SMTP does not take
    for line breaks: a line long only between CR/LF would go out unwrapped, and the
    mail server refuses it (500 Line too long)."""
    if any(len(line.encode("utf-8")) > MAX_LINE_BYTES for line in value.splitlines()):
        return  # quoted-printable: every line wrapped
    longest = max(len(line.encode("utf-8")) for line in _CR_LF.split(value))
    if longest > MAX_LINE_BYTES:
        raise InvalidNotification(
            field,
            f"has a line of {longest} bytes between line breaks, more than the {MAX_LINE_BYTES} a mail "
            "server takes, that Django's email code would not wrap (it counts form feeds and Unicode "
            "line separators as line ends); break it with \\n",
        )


class Metadata(NamedTuple):
    """Checked metadata: the dict as given, its JSON text, and how many characters
    longer PostgreSQL's jsonb writes its numbers (what the relay publishes)."""

    value: dict[str, Any]
    text: str
    render_extra: int


def metadata(value: Any) -> Metadata:
    if value is None:
        return Metadata({}, "{}", 0)
    if not isinstance(value, dict):
        raise InvalidNotification("metadata", f"must be a dict, got {type(value).__name__}")
    try:
        # PostgreSQL's jsonb refuses NaN and Infinity, which json.dumps writes by default.
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidNotification("metadata", f"must be JSON-serializable ({exc})") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # in a key or a value, at any depth
        raise InvalidNotification("metadata", NOT_UNICODE) from None
    if _JSON_NUL.search(text):
        raise InvalidNotification("metadata", "must not contain NUL characters")
    extra = _render_extra(value) if _EXPONENT.search(text) else 0
    if size + extra > MAX_METADATA_BYTES:
        raise InvalidNotification("metadata", "is larger than 64 KiB as JSON")
    return Metadata(value, text, extra)


def _render_extra(value: Any) -> int:
    """The characters PostgreSQL adds when it writes back the floats of ``value`` that
    Python writes with an exponent (jsonb keeps numbers as ``numeric``, which has none:
    1e-07 comes back as 0.0000001). Refuses a float that would come back as another
    number: 1e+23 comes back as the integer 10**23, which is not the float 1e+23."""
    extra = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, float):
            written = repr(item)
            if "e" not in written:
                continue
            exact = Decimal(written)
            if "e+" in written:
                if exact != Decimal(item):
                    raise InvalidNotification(
                        "metadata",
                        f"the number {written} would come back from PostgreSQL's jsonb as "
                        f"{int(exact)}, another number; send it as a string",
                    )
                extra += len(str(int(exact))) - len(written)
            else:
                extra += len(format(exact, "f")) - len(written)
    return extra


# Room in a broker message for the task around its notifications (argument lists,
# keyword arguments, the embedded options).
MESSAGE_OVERHEAD = 4096
# The creation time the relay adds to each notification, in its ISO form.
_CREATED_AT = "2000-01-01T00:00:00.000000+00:00"
MESSAGE_FIELDS = ("key", "service", "notification_id", "user_id", "to", "from_email", "subject", "body", "html_body")
_SHORT_FIELDS = ("template", "language", "priority", "backend")


def message_size(row: dict[str, Any], meta: Metadata) -> None:
    """Refuse a notification that alone would not fit in a broker message of
    ``NOTIFICATIONS_MAX_MESSAGE_BYTES`` (less ``MESSAGE_OVERHEAD``): its text fields and
    its metadata as JSON text, as the relay publishes them, in JSON with every non-ASCII
    character escaped (kombu's json.dumps), which can make it several times its UTF-8
    size. Names the largest field.

    A cheap upper bound first (an escaped character is at most 6 bytes, an astral one
    12); the exact size only when the bound says it might not fit.
    """
    limit = int(settings.MAX_MESSAGE_BYTES) - MESSAGE_OVERHEAD
    texts = {name: row[name] for name in MESSAGE_FIELDS}
    texts["metadata"] = meta.text
    bound = 512 + meta.render_extra + sum((6 if s.isascii() else 12) * len(s) for s in texts.values())
    bound += sum(12 * len(str(row.get(name) or "")) + 16 for name in _SHORT_FIELDS) + 2 * 48
    if bound <= limit:
        return
    sizes = {name: len(json.dumps(text)) for name, text in texts.items()}
    # The relay sends jsonb's text: the same length once escaped, but for its numbers.
    sizes["metadata"] += meta.render_extra
    sizes["created_at"] = len(json.dumps(_CREATED_AT))
    for name in _SHORT_FIELDS:  # short, but in the message all the same
        sizes[name] = len(json.dumps(row.get(name) or ""))
    for name in ("send_at", "expires_at"):
        sizes[name] = len(json.dumps(_CREATED_AT if row.get(name) else None))
    # {"name": value, ...} as json.dumps writes it, and ", " after it in the list.
    total = 2 + sum(len(json.dumps(name)) + 2 + size for name, size in sizes.items()) + 2 * (len(sizes) - 1) + 2
    for name in ("created_at", *_SHORT_FIELDS, "send_at", "expires_at"):
        del sizes[name]
    if total <= limit:
        return
    largest = max(sizes, key=lambda name: sizes[name])
    raise InvalidNotification(
        largest,
        f"the notification would be {total} bytes in a broker message (JSON, non-ASCII characters "
        f"escaped), more than the {limit} that NOTIFICATIONS_MAX_MESSAGE_BYTES "
        f"({settings.MAX_MESSAGE_BYTES}) leaves for one notification; {largest} is {sizes[largest]} bytes of it",
    )


# How far ahead a notification may be scheduled, or given to expire: a typo in a year
# would otherwise hold an outbox row (and a place in every operator's list) for ever.
MAX_SCHEDULE_DAYS = 366


def moment(field: str, value: Any) -> datetime | None:
    """``send_at`` / ``expires_at``: an aware ``datetime`` (a naive one has no meaning
    across services in other time zones), within ``MAX_SCHEDULE_DAYS`` from now."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidNotification(field, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidNotification(field, "must be an aware datetime (with a time zone), got a naive one")
    try:
        if value - timezone.now() > timedelta(days=MAX_SCHEDULE_DAYS):
            raise InvalidNotification(field, f"is more than {MAX_SCHEDULE_DAYS} days ahead")
    except OverflowError:
        raise InvalidNotification(field, "is out of range") from None
    return value.astimezone(UTC)


def schedule(send_at: datetime | None, expires_at: datetime | None) -> None:
    """An expiry that has passed, or that comes before the send time, could only ever
    end the notification ``expired``: refused, so the caller hears of it now."""
    now = timezone.now()
    if expires_at is not None and expires_at <= now:
        raise InvalidNotification("expires_at", "is not in the future")
    if expires_at is not None and send_at is not None and expires_at <= send_at:
        raise InvalidNotification("expires_at", "must be later than send_at")


PRIORITIES = ("normal", "high")


def priority(value: Any) -> str:
    if value is None:
        return "normal"
    if value not in PRIORITIES or not isinstance(value, str):
        raise InvalidNotification("priority", f"must be one of {', '.join(map(repr, PRIORITIES))}, got {value!r}")
    return str(value)


def backend(value: Any) -> str:
    """A name in ``NOTIFICATIONS_BACKENDS`` (None: the default one), stored resolved, so
    the row says which backend it went through."""
    from . import backends

    if value is None:
        return backends.default_name()
    if not isinstance(value, str):
        raise InvalidNotification("backend", f"must be a string, got {type(value).__name__}")
    names = backends.names()
    if value not in names:
        raise InvalidNotification("backend", f"{value!r} is not in NOTIFICATIONS_BACKENDS ({', '.join(names)})")
    return value


def language(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 35 or not re.fullmatch(r"[A-Za-z0-9_-]*", value):
        raise InvalidNotification("language", f"must be a language code such as 'de' or 'pt-br', got {value!r}")
    return value
