"""Properties of notify() over arbitrary input: it either refuses the notification
(InvalidNotification naming a keyword argument, and nothing written), or the email
arrives intact at a real SMTP server after the real trip: notify() in PostgreSQL, the
relay publishing to RabbitMQ, the delivery message taken off the queue with kombu's
decoding, deliver_many() sending it through Django's SMTP backend.

"Intact", as compared here on what the server received, parsed with the stdlib email
package (``policy=email.policy.default``) and decoded:

- subject, X-Notification-Key and Message-ID: equal to what notify() stored, once the
  whitespace around the header value is stripped (a folded header line starts its value
  with the fold's space); notify() stores the subject without surrounding whitespace.
- body and html body: equal to what notify() stored, with line endings normalised to
  ``\\n`` (SMTP carries CRLF, and a lone CR or LF becomes one) and one at the end (a
  body that ends without a line break gets one: SMTP's DATA ends with CRLF).
- From and To: the same display name and local part as stored, and the domain as
  Django's email code encodes it (IDNA: ASCII, lower case for an internationalised one);
  the envelope recipient is that address. A non-ASCII display name travels as encoded
  words (RFC 2047), several for a long one, and Python's address parser puts a space
  between two of them, where RFC 2047 says to drop the whitespace: such a header is
  decoded with ``email.header.decode_header``, which follows the RFC, and compared whole.
  (notify() stores a display name with single spaces between its words.)
- metadata: what the worker decodes equals what was given after a JSON round trip.

Anything that cannot arrive intact must be refused at notify(); the regression tests for
what these properties found are in test_validation.py.
"""

from __future__ import annotations

import email.policy
import json
import string
from collections.abc import Callable, Iterator
from email.header import decode_header, make_header
from email.utils import formataddr
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils.encoding import punycode
from hypothesis import event, given
from hypothesis import strategies as st

from notifications import InvalidNotification, mail, notify
from notifications.delivery import deliver_many
from notifications.managers import decode_metadata
from notifications.models import Notification, OutboxMessage, SentEmail, message_id_for
from notifications.relay import relay_batch
from tests.conftest import take_delivery_payloads, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ARGUMENTS = {"service", "notification_id", "user_id", "to", "from_email", "subject", "body", "html_body", "metadata"}

# Text: mostly printable, with pieces that have broken mail pipelines before.
TRICKY = st.sampled_from(
    [
        *"\r\n\t\x00\x01\x0b\x0c\x1b\x7f\x85\u2028\u2029\xa0\u200b\ufeff",
        "\r\n",
        "\ud800",
        "\udfff",
        "\ud83d\ude00",  # two surrogate code points, not the emoji
        "😀",
        "𝄞",
        "é",
        "日本語",
        "=?utf-8?q?x?=",
        *'"\\<>@,;:()[]. ',
        "  ",
        "\n.\n",
        "From ",
    ]
)
ANY_CHARACTER = st.characters(exclude_categories=())  # every code point, lone surrogates too


def text(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=8),
        st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=4),
        st.text(ANY_CHARACTER, min_size=1, max_size=2),
        TRICKY,
    )
    return st.lists(piece, min_size=min_size, max_size=max_size).map("".join)


def long_line() -> st.SearchStrategy[str]:
    """A line hundreds to thousands of characters long (headers fold, bodies wrap)."""
    return st.builds(lambda s, n: s * n, st.one_of(text(1, 3), TRICKY), st.integers(100, 1500))


def body_text() -> st.SearchStrategy[str]:
    return st.lists(st.one_of(text(0, 20), long_line()), min_size=1, max_size=4).map("".join)


# Addresses.

ATOM = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
LABELS = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True),
    st.text(st.sampled_from("abzüößéñжא日本語中文한"), min_size=1, max_size=8),
    st.sampled_from(["xn--bcher-kva", "faße", "ÜBER", "a\u200db", "Ⅳ", "ü" * 60, "EXAMPLE", "-a", "a" * 64]),
)


def domains() -> st.SearchStrategy[str]:
    tld = st.sampled_from(["com", "de", "example", "xn--p1ai", "рф", "COM"])
    named = st.builds(lambda labels, top: ".".join([*labels, top]), st.lists(LABELS, min_size=1, max_size=3), tld)
    odd = st.sampled_from(["[10.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "localhost", "example.com."])
    return st.one_of(named, named, named, odd)


def local_parts() -> st.SearchStrategy[str]:
    dot_atom = st.lists(st.text(ATOM, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
    quoted = st.text(st.sampled_from(string.printable[:95]), max_size=10).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    )
    return st.one_of(dot_atom, dot_atom, dot_atom, quoted, text(1, 4))


def formatted(name: str, spec: str) -> str:
    """formataddr()'s quoting of a display name, where it can (it encodes a non-ASCII
    name, and refuses a non-ASCII address)."""
    try:
        return formataddr((name, spec))
    except UnicodeError:
        return f"{name} <{spec}>"


def addresses() -> st.SearchStrategy[str]:
    spec = st.builds(lambda local, domain: f"{local}@{domain}", local_parts(), domains())
    ascii_name = st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]), max_size=12)
    long_name = st.builds(  # headers fold it
        lambda words, n: " ".join(words * n),
        st.lists(st.one_of(text(1, 2), ascii_name), min_size=1, max_size=3),
        st.integers(1, 60),
    )
    name = st.one_of(
        ascii_name, text(0, 6), long_name, st.sampled_from(["=?utf-8?q?x?=", "Ann (billing)", 'A "B" C', "O'Brien"])
    )
    return st.one_of(
        spec,
        st.builds(lambda n, a: f"{n} <{a}>", name, spec),
        st.builds(lambda n, a: f'"{n}" <{a}>', name, spec),
        st.builds(formatted, name, spec),
    )


# Identifiers and metadata.


def identifiers() -> st.SearchStrategy[Any]:
    return st.one_of(text(1, 6), st.integers(-(10**12), 10**12), st.builds(lambda s: s * 40, text(1, 2)))


def metadata() -> st.SearchStrategy[Any]:
    keys = st.one_of(text(0, 3), st.sampled_from(["__type__", "__value__", "", "a"]), st.integers(-5, 5))
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),  # NaN and infinities included: jsonb has neither
        text(0, 4),
    )
    typed = st.fixed_dictionaries(
        {"__type__": st.sampled_from(["bytes", "datetime", "uuid", "decimal", "date"]), "__value__": text(0, 4)}
    )
    values = st.recursive(
        st.one_of(scalars, typed),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
        max_leaves=10,
    )
    return st.one_of(st.none(), st.dictionaries(keys, values, max_size=4), typed)


# The trip.


def parse(address: str) -> tuple[str, str, str]:
    """(display name, local part, domain) of one stored address, read as the received
    headers are read."""
    [parsed] = email.policy.default.header_factory("To", address).addresses
    return parsed.display_name, parsed.username, parsed.domain


def lines(text: str) -> str:
    """Line endings as ``\n``, and one at the end (SMTP's DATA ends with a line break:
    a body without a final one gets it)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


@pytest.fixture
def trip(settings: Any, smtp_server: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
    """``check(kwargs)``: notify() with them, and either a refusal that writes nothing or
    the whole trip with every part compared on arrival."""

    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False  # no worker runs: the test relays
    # pytest-django swaps in the locmem backend; the trip ends at the real server.
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    mail.drop_connection()  # a connection this thread kept from another backend
    take_delivery_payloads()

    def check(kwargs: dict[str, Any]) -> None:
        SentEmail.objects.all().delete()  # keys may repeat across examples
        Notification.objects.all().delete()
        try:
            n = notify(**kwargs)
        except InvalidNotification as exc:
            event(f"refused: {exc.field}")
            assert exc.field in ARGUMENTS, exc
            assert str(exc).startswith(f"{exc.field}: ")
            assert not Notification.objects.exists() and not OutboxMessage.objects.exists()
            return
        event("accepted")
        assert relay_batch() == 1
        [[payload]] = take_delivery_payloads(wait=10, limit=1)
        assert payload["key"] == n.key
        assert decode_metadata(payload["metadata"]) == json.loads(json.dumps(kwargs.get("metadata") or {}))
        message_id = message_id_for(n.key)
        earlier = len(smtp_server.all_messages())  # keys repeat across examples
        [outcome] = deliver_many([payload])
        assert outcome.status == "sent", outcome
        [received] = wait_for(  # recorded before the server's reply: no wait, in practice
            lambda: [r for r in smtp_server.all_messages()[earlier:] if r.message_id == message_id],
            timeout=2,
            what="the email",
        )
        message = received.message
        assert str(message["Message-ID"]).strip() == message_id
        assert str(message["X-Notification-Key"]).strip() == n.key
        assert str(message["Subject"]).strip() == n.subject
        assert lines(message.get_body(("plain",)).get_content()) == lines(n.body)
        if n.html_body:
            assert lines(message.get_body(("html",)).get_content()) == lines(n.html_body)
        else:
            assert message.get_body(("html",)) is None
        for header, stored in (("To", n.to), ("From", n.from_email or django_settings.DEFAULT_FROM_EMAIL)):
            [got] = message[header].addresses
            name, local, domain = parse(stored)
            assert (got.username, got.domain) == (local, punycode(domain)), header
            raw = "".join(v for k, v in message.raw_items() if k == header).replace("\r", "").replace("\n", "")
            if "=?" in raw:  # an encoded display name: decoded by RFC 2047's rules (see the module docstring)
                assert str(make_header(decode_header(raw))).strip(" ") == f"{name} <{got.addr_spec}>", header
            else:
                assert got.display_name == name, header
        [got] = message["To"].addresses
        assert received.to == [got.addr_spec]

    yield check
    mail.drop_connection()


def valid(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "service": "props",
        "notification_id": "n-1",
        "user_id": "u-1",
        "to": "ann@example.com",
        "subject": "Your invoice",
        "body": "Hello Ann",
    }
    values.update(overrides)
    return values


@given(
    subject=st.one_of(text(1, 20), long_line()),
    body=body_text(),
    html_body=st.one_of(st.none(), body_text()),
)
def test_any_text_is_refused_or_arrives_intact(trip: Any, subject: str, body: str, html_body: str | None) -> None:
    trip(valid(subject=subject, body=body, html_body=html_body))


@given(to=addresses(), from_email=st.one_of(st.none(), addresses()))
def test_any_address_is_refused_or_arrives_intact(trip: Any, to: str, from_email: str | None) -> None:
    trip(valid(to=to, from_email=from_email))


@given(service=identifiers(), notification_id=identifiers(), user_id=identifiers())
def test_any_ids_are_refused_or_arrive_intact(trip: Any, service: Any, notification_id: Any, user_id: Any) -> None:
    trip(valid(service=service, notification_id=notification_id, user_id=user_id))


@given(metadata=metadata())
def test_any_metadata_is_refused_or_arrives_intact(trip: Any, metadata: Any) -> None:
    trip(valid(metadata=metadata))
