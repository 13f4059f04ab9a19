"""notifications.mime: the bytes it writes are the bytes Django's email code would send,
and its envelope is the one Django's SMTP backend would give; whatever it does not write
goes through Django unchanged, and every other email backend gets the message object.

The comparisons take Django's own output as the reference: ``message().as_bytes(linesep=
"\\r\\n")`` and ``sanitize_address`` on the sender and the recipient, as the SMTP backend
calls them. The Date header and the MIME boundary come from the same sources on both
sides (``time.time`` through ``email.utils.formatdate``, and the ``random`` module through
``email.generator``), so the clock is frozen and the random generator seeded alike before
each side builds its email.
"""

from __future__ import annotations

import random
import re
import smtplib
import string
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from email.generator import Generator
from email.headerregistry import Address
from typing import Any
from unittest import mock

import pytest
from aiosmtpd.controller import Controller
from django.conf import settings as django_settings
from django.core import mail as django_mail
from django.core.mail import EmailMultiAlternatives, get_connection
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.mail.message import sanitize_address
from django.test import override_settings
from hypothesis import event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from notifications import mail, mime, validation
from notifications.chaos.mailserver import RecordingHandler
from notifications.exceptions import InvalidNotification, UnbuildableEmail
from tests.conftest import free_port, wait_for
from tests.test_properties import addresses as any_addresses

SMTP = "django.core.mail.backends.smtp.EmailBackend"
FROZEN = 1_700_000_000.5  # the clock both sides read for the Date header
BACKENDS = {
    "default": {"BACKEND": SMTP},
    "idempotent": {"BACKEND": SMTP, "IDEMPOTENCY_HEADER": "Idempotency-Key"},
}


def django_side(message: EmailMultiAlternatives, seed: int) -> mime.Prepared | Exception:
    """What Django's SMTP backend sends for ``message``: the envelope its ``_send`` works
    out, then the message's bytes (or the exception it raises on the way)."""
    encoding = message.encoding or django_settings.DEFAULT_CHARSET
    try:
        with mock.patch("time.time", return_value=FROZEN):
            sender = sanitize_address(message.from_email, encoding)
            recipients = [sanitize_address(address, encoding) for address in message.recipients()]
            random.seed(seed)
            data = message.message().as_bytes(linesep="\r\n")
    except Exception as exc:
        return exc
    return mime.Prepared(sender, recipients, data)


def fast_side(message: EmailMultiAlternatives, seed: int) -> mime.Prepared | None:
    with mock.patch("time.time", return_value=FROZEN):
        random.seed(seed)
        return mime.prepare(message)


def compare(message: EmailMultiAlternatives, seed: int = 0) -> str:
    """Whether the fast path wrote ``message`` ("fast") or left it to Django ("django",
    "raises": Django refuses it); where it wrote it, byte for byte what Django writes."""
    expected = django_side(message, seed)
    prepared = fast_side(message, seed)
    if isinstance(expected, Exception):
        assert prepared is None, f"Django raises {expected!r}, the fast path wrote {prepared!r}"
        return "raises"
    if prepared is None:
        return "django"
    assert prepared.data == expected.data, _difference(expected.data, prepared.data)
    assert (prepared.from_email, prepared.recipients) == (expected.from_email, expected.recipients)
    return "fast"


def _difference(expected: bytes, got: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    around = slice(max(at - 80, 0), at + 80)
    return f"first difference at byte {at}:\nDjango: {expected[around]!r}\nfast:   {got[around]!r}"


def payload(**fields: Any) -> dict[str, Any]:
    values = {"key": "tests:n-1:42", "to": "ann@example.com", "subject": "Your invoice", "body": "Hello Ann"}
    values.update(fields)
    return values


# Generated input. Header text mixes what folds (spaces, long words), what is encoded
# (non-ASCII), what Django refuses (CR, LF) and what notify() would refuse but
# build_message() could still be handed (other control characters, encoded words).

HEADER_PIECES = st.one_of(
    st.text(st.sampled_from(string.ascii_letters + string.digits + string.punctuation), min_size=1, max_size=12),
    st.sampled_from([" ", " ", " ", "  ", "\t", ", ", "; "]),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=3),
    st.sampled_from(["é", "Grüße", "日本語", "😀", "=?utf-8?q?x?=", '"', "\\", "\x0b", "\x7f", "\x85", "\u2028"]),
)


def header_text(max_pieces: int = 12) -> st.SearchStrategy[str]:
    short = st.lists(HEADER_PIECES, max_size=max_pieces).map("".join)
    repeated = st.builds(
        lambda s, n: (s * n)[:998], st.lists(HEADER_PIECES, min_size=1, max_size=3).map("".join), st.integers(2, 200)
    )
    around_a_fold = st.builds(  # words ending near column 78 of a header line
        lambda word, n, tail: " ".join([word] * n) + tail,
        st.text(string.ascii_letters, min_size=1, max_size=9),
        st.integers(1, 30),
        st.sampled_from(["", " ", "x", "é"]),
    )
    one_word = st.builds(lambda n: "w" * n, st.integers(60, 120))
    return st.one_of(short, short, repeated, around_a_fold, one_word)


def body_text() -> st.SearchStrategy[str]:
    unicode_line = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
    ascii_line = st.text(string.printable, max_size=80)
    special = st.sampled_from(
        ["From here", ".", "..", ". x", "trailing   ", "\t", "Grüße", "--===============0==", "=" * 20]
    )
    long_line = st.builds(  # around the 998-octet limit, in characters of 1 to 3 octets
        lambda c, n: c * n, st.sampled_from(["a", "é", "日", " ", "\x0c"]), st.integers(300, 1100)
    )
    line = st.sampled_from([unicode_line, ascii_line] * 3 + [special, special, long_line]).flatmap(lambda s: s)
    ending = st.sampled_from(["\n", "\n", "\r\n", "\r", "", "\n\n", "\x0c", "\u2028"])
    return st.lists(st.tuples(line, ending).map("".join), max_size=8).map("".join)


def keys() -> st.SearchStrategy[str]:
    part = st.one_of(
        st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=20),
        st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=8),
        st.builds(lambda s, n: s * n, st.text(string.ascii_letters + " ", min_size=1, max_size=3), st.integers(10, 70)),
    )
    return st.builds(lambda a, b, c: f"{a}:{b}:{c}", part, part, part)


def recipients(valid_only: bool = False) -> st.SearchStrategy[str]:
    simple = st.builds(
        lambda local, domain: f"{local}@{domain}",
        st.from_regex(r"[A-Za-z0-9_%+-]{1,20}(\.[A-Za-z0-9_%+-]{1,8}){0,2}", fullmatch=True),
        st.sampled_from(["example.com", "EXAMPLE.org", "localhost", "a-b.c-d.example", "x" * 63 + ".com", "bücher.de"]),
    )
    named = st.builds(lambda name, spec: f"{name} <{spec}>", header_text(6), simple)
    quoted = st.builds(_quoted, header_text(8), simple)
    fixed = st.sampled_from(
        [
            '"Doe, Jane" <jane@example.com>',
            'Jane "JD" Doe <jane@example.com>',
            "Jörg Müller <joerg@example.com>",
            "jörg@bücher.de",
            "Ann <ann@bücher.de>",
            "josé@example.com",
            '"a b"@example.com',
            "ann@[10.0.0.1]",
            "ann@" + "x" * 64 + ".com",
            "not an address",
            "",
            "Ann\n <ann@example.com>",
            "A Very Long Display Name Of The Kind Some Senders Have, In Several Words <billing@example.com>",
        ]
    )
    if valid_only:
        return st.one_of(simple, quoted)
    # Weighted by hand (one_of() flattens nested choices into equal ones): mostly what
    # Django takes, a fifth of what it may refuse.
    return st.sampled_from([simple, quoted] * 4 + [named, fixed, any_addresses()]).flatmap(lambda chosen: chosen)


def _quoted(name: str, spec: str) -> str:
    """The display name quoted where it needs it, as notify() stores an address."""
    try:
        return str(Address(display_name=name, addr_spec=spec))
    except Exception:  # a name Address refuses (a line break): as it is
        return f"{name} <{spec}>"


def as_validated(field: str, value: str) -> str:
    """The stored form notify() would give ``value``, where it takes it."""
    try:
        if field == "subject":
            return validation.subject(value)
        return validation.address(field, value, required=field == "to")
    except InvalidNotification:
        return value


payloads = st.fixed_dictionaries(
    {
        "key": keys(),
        "to": recipients(),
        "from_email": st.one_of(st.just(""), recipients(valid_only=True), recipients()),
        "subject": st.one_of(header_text(), st.sampled_from(["", "x" * 69, "x" * 70, "x " * 35, "Grüße " * 20])),
        "body": body_text(),
        "html_body": st.one_of(st.just(""), body_text()),
        "backend": st.sampled_from(["", "idempotent"]),
    }
)
senders = st.sampled_from(
    [
        "notifications@localhost",
        "Billing <billing@example.com>",
        '"Example, Inc." <noreply@example.com>',
        "Bücher <noreply@bücher.de>",
        "Notifications From A Service With A Rather Long Name Indeed <notifications@example.com>",
    ]
)


@pytest.fixture
def differential_settings(settings: Any) -> None:
    settings.NOTIFICATIONS_BACKENDS = BACKENDS


def test_the_fast_path_writes_what_django_writes(differential_settings: None) -> None:
    seen: Counter[str] = Counter()

    @hypothesis_settings(max_examples=600)
    @given(
        payloads,
        st.booleans(),
        senders,
        st.booleans(),
        st.sampled_from(["notifications.local", "x.io", "mail." + "d" * 50 + ".example.com"]),
        st.integers(0, 2**32),
    )
    def check(item: dict[str, Any], validated: bool, sender: str, localtime: bool, domain: str, seed: int) -> None:
        if validated:  # what reaches build_message() after notify()
            item = {**item, **{f: as_validated(f, item[f]) for f in ("to", "from_email", "subject")}}
        with override_settings(
            DEFAULT_FROM_EMAIL=sender, EMAIL_USE_LOCALTIME=localtime, NOTIFICATIONS_MESSAGE_ID_DOMAIN=domain
        ):
            outcome = compare(mail.build_message(item), seed)
        event(outcome)
        seen[outcome] += 1

    check()
    total = sum(seen.values())
    # The comparison means something only if most emails took the fast path, and the
    # fallbacks were exercised too.
    assert seen["fast"] >= 0.5 * total, seen
    assert seen["django"] and seen["raises"], seen


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"html_body": "<p>Hello Ann</p>"},
        {"body": "", "html_body": "<p>Only HTML</p>"},
        {"subject": "x" * 68},
        {"subject": "x" * 69},
        {"subject": "x" * 70},
        {"subject": "x" * 76},
        {"subject": "x" * 77},
        {"subject": "x" * 200},
        {"subject": "word " * 15 + "w"},
        {"subject": "Ihre Rechnung für März"},
        {"subject": "Ihre Rechnung für März, " * 10},
        {"subject": "=?utf-8?q?x?="},
        {"subject": "tab\there"},
        {"to": "a" * 62 + "@example.com"},
        {"to": "a" * 63 + "@example.com"},
        {"to": "Ann Example <" + "a" * 50 + "@example.com>"},
        {"to": '"Doe, Jane" <jane@example.com>'},
        {"to": "Jörg <joerg@bücher.de>"},
        {"to": "jörg@example.com"},
        {"to": "Ann <ann@" + "x" * 63 + ".com>"},
        {"from_email": "Bücher GmbH, Abteilung Rechnungen <rechnungen@bücher.de>"},
        {"from_email": "b" * 60 + "@example.com"},  # "From: " and 72 characters: 78
        {"from_email": "b" * 61 + "@example.com"},
        {"from_email": "Billing Department Of Example " + "b" * 30 + " <b@example.com>"},
        {"key": "s:" + "k" * 54 + ":1"},  # "X-Notification-Key: " and 58 characters: 78
        {"key": "s:" + "k" * 55 + ":1"},
        {"key": "s:" + "k " * 27 + "k:1"},
        {"key": "s:" + "k " * 28 + ":1"},
        {"key": "s:" + "k" * 300 + ":1"},
        {"key": "s:with spaces " * 10 + ":1"},
        {"key": "dienst:nachricht:jörg"},
        {"key": "s:n:u", "backend": "idempotent"},
        {"key": "s:" + "é" * 300 + ":u", "backend": "idempotent"},
        {"body": "a" * 998},
        {"body": "a" * 999},
        {"body": "é" * 499},
        {"body": "é" * 500},
        {"body": ("a" * 600 + "\x0c") * 2},
        {"body": "one\rtwo\r\nthree\nfour\n\r"},
        {"body": "From me\n.\n..\n. dot\ntrailing   \n\t\n"},
        {"body": "Grüße\n", "html_body": "<p>Grüße</p>\n"},
        {"body": "x\n--===============1234567890123456789==\n", "html_body": "=" * 40},
    ],
)
def test_edge_cases_are_written_as_django_writes_them(differential_settings: None, fields: dict[str, Any]) -> None:
    compare(mail.build_message(payload(**fields)))


def test_what_the_fast_path_leaves_to_django(differential_settings: None) -> None:
    assert compare(mail.build_message(payload(body="a" * 999))) == "django"  # quoted-printable
    assert compare(mail.build_message(payload(subject="a\nb"))) == "raises"  # BadHeaderError
    assert compare(mail.build_message(payload(to="Ann\r <ann@example.com>"))) == "raises"
    assert compare(mail.build_message(payload(body="\ud800"))) == "raises"  # not UTF-8
    message = mail.build_message(payload())
    message.cc = ["bob@example.com"]
    assert compare(message) == "django"
    message = mail.build_message(payload())
    message.attach("a.txt", "text", "text/plain")
    assert compare(message) == "django"
    message = mail.build_message(payload())
    message.extra_headers["Date"] = "Mon, 01 Jan 2024 00:00:00 -0000"
    assert compare(message) == "django"
    with override_settings(DEFAULT_CHARSET="iso-8859-1"):
        assert compare(mail.build_message(payload())) == "django"
    with mock.patch("django.VERSION", (6, 0, 0, "final", 0)):  # written for 5.2's email code
        assert compare(mail.build_message(payload())) == "django"


def test_a_boundary_found_in_the_text_is_replaced_as_django_replaces_it(differential_settings: None) -> None:
    random.seed(3)
    drawn = Generator._make_boundary()  # type: ignore[attr-defined]
    message = mail.build_message(payload(html_body=f"<p>x</p>\n--{drawn}"))
    assert compare(message, seed=3) == "fast"
    prepared = fast_side(message, 3)
    assert prepared is not None and f'boundary="{drawn}.0"'.encode() in prepared.data


def test_envelope_addresses_are_django_s() -> None:
    for address in [
        "ann@example.com",
        "A.b+c%d_e-f@x-y.example",
        "ann@localhost",
        "Ann <ann@example.com>",
        "jörg@bücher.de",
    ]:
        assert mime.envelope_address(address, "utf-8") == sanitize_address(address, "utf-8")
    with pytest.raises(ValueError):
        mime.envelope_address("ann@" + "x" * 64 + ".com", "utf-8")  # sanitize_address's own error


BARE = r"[A-Za-z0-9_%+-]{1,10}(\.[A-Za-z0-9_%+-]{1,5}){0,2}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){0,2}"


@given(st.from_regex(BARE, fullmatch=True))
def test_a_bare_address_passes_as_sanitize_address_gives_it(address: str) -> None:
    assert mime.envelope_address(address, "utf-8") == sanitize_address(address, "utf-8")


class ResendingBackend(SMTPBackend):
    """An SMTP backend that changes how one email is sent: it gets the message object."""

    def _send(self, email_message: Any) -> bool:
        return bool(super()._send(email_message))


class ConnectingBackend(SMTPBackend):
    """An SMTP backend that changes only how it connects: it gets the bytes."""


@pytest.mark.parametrize(
    ("path", "gets_bytes"),
    [
        (SMTP, True),
        ("tests.test_mime.ConnectingBackend", True),
        ("tests.test_mime.ResendingBackend", False),
        ("django.core.mail.backends.locmem.EmailBackend", False),
        ("django.core.mail.backends.console.EmailBackend", False),
        ("django.core.mail.backends.filebased.EmailBackend", False),
        ("tests.http_backend.EmailBackend", False),
    ],
)
def test_only_django_s_smtp_backend_gets_bytes(path: str, gets_bytes: bool, tmp_path: Any) -> None:
    assert mime.sends_bytes(get_connection(path, file_path=str(tmp_path))) is gets_bytes


def test_another_backend_gets_the_email_message_itself(settings: Any) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.NOTIFICATIONS_BACKENDS = None
    mail.drop_connection()
    message = mail.build_message(payload(subject="Grüße", html_body="<p>Grüße</p>"))
    try:
        mail.send(message)
    finally:
        mail.drop_connection()
    [received] = django_mail.outbox
    # locmem keeps a copy of what it was handed: the message object, as Django made it.
    assert type(received) is EmailMultiAlternatives
    assert [received.subject, received.to, received.extra_headers] == [
        message.subject,
        message.to,
        message.extra_headers,
    ]
    assert received.alternatives == [("<p>Grüße</p>", "text/html")]
    assert b"Subject: =?utf-8?b?R3LDvMOfZQ==?=" in received.message().as_bytes(linesep="\r\n")


# End to end: the real aiosmtpd server, with a handler that also keeps the raw DATA.


class RawHandler(RecordingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.raw: list[tuple[str, list[str], bytes]] = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.arrived:
            self.raw.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            self.arrived.notify_all()
        return str(await super().handle_DATA(server, session, envelope))


@pytest.fixture
def raw_server(settings: Any) -> Iterator[RawHandler]:
    handler = RawHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    settings.NOTIFICATIONS_BACKENDS = {"default": {"BACKEND": SMTP, "OPTIONS": {"host": "127.0.0.1", "port": port}}}
    mail.drop_connection()
    try:
        yield handler
    finally:
        mail.drop_connection()
        controller.stop()


def _received(handler: RawHandler, count: int) -> tuple[str, list[str], bytes]:
    wait_for(lambda: len(handler.raw) >= count, timeout=10, what="the email at the server")
    return handler.raw[count - 1]


_DATE = re.compile(rb"^Date: [^\r\n]*\r\n", re.MULTILINE)
_BOUNDARY = re.compile(rb"={15}\d{19}==")


def _steady(data: bytes) -> bytes:
    """The bytes with the Date line and the MIME boundary (what differs from one send to
    the next) replaced, once each exactly where they were."""
    assert len(_DATE.findall(data)) == 1, data[:400]
    return _BOUNDARY.sub(b"BOUNDARY", _DATE.sub(b"Date: DATE\r\n", data))


NON_ASCII = payload(
    key="dienst:rechnung-7:jörg",
    to="Jörg Müller <joerg@bücher.de>",
    from_email="Bücher GmbH <rechnungen@bücher.de>",
    subject="Ihre Rechnung für März: 1.234,56 € fällig am 31. März, bitte beachten Sie die Frist",
    body="Grüße, Jörg!\n.\n..Punkt\nFrom Bücher\nZeile mit Leerzeichen   \n\nEnde",
    html_body="<p>Grüße, Jörg!</p>\n<p>Ende</p>\n",
)


@pytest.mark.parametrize("fields", [NON_ASCII, {**NON_ASCII, "html_body": ""}], ids=["html", "text"])
def test_the_mail_server_receives_django_s_bytes(raw_server: RawHandler, fields: dict[str, Any]) -> None:
    message = mail.build_message(fields)
    expected = message.message().as_bytes(linesep="\r\n")
    assert mime.prepare(message) is not None  # the fast path writes this one
    assert mail.send(message).startswith("250")
    mail_from, rcpt_tos, data = _received(raw_server, 1)
    # SMTP's DATA ends with a line break: smtplib adds one to a message without it.
    assert _steady(data) == _steady(expected if expected.endswith(b"\r\n") else expected + b"\r\n")
    # smtplib gives the server the address part of each envelope address (quoteaddr).
    sender, recipient = (sanitize_address(address, "utf-8") for address in (message.from_email, fields["to"]))
    assert mail_from == smtplib.quoteaddr(sender)[1:-1] == "rechnungen@xn--bcher-kva.de"
    assert rcpt_tos == [smtplib.quoteaddr(recipient)[1:-1]] == ["joerg@xn--bcher-kva.de"]


def _spied(backend_name: str | None = None) -> list[Any]:
    """The calls this thread's connection gets to its send_messages (Django's own)."""
    opened = mail.connection(backend_name)
    calls: list[Any] = []
    original: Callable[[Any], int] = opened.send_messages

    def send_messages(messages: Any) -> int:
        calls.append(list(messages))
        return original(messages)

    opened.send_messages = send_messages
    return calls


def test_with_the_fast_path_off_django_builds_every_email(raw_server: RawHandler, settings: Any) -> None:
    settings.NOTIFICATIONS_FAST_MIME = False
    message = mail.build_message(NON_ASCII)
    calls = _spied()
    assert mail.send(message).startswith("250")
    assert calls == [[message]]
    settings.NOTIFICATIONS_FAST_MIME = True
    again = mail.build_message(NON_ASCII)
    assert mail.send(again).startswith("250")
    assert calls == [[message]]  # the second went as bytes
    off, on = _received(raw_server, 1), _received(raw_server, 2)
    assert (off[0], off[1], _steady(off[2])) == (on[0], on[1], _steady(on[2]))


@pytest.mark.parametrize(
    "fields",
    [{"subject": "a\nb"}, {"from_email": "ann@example.com <bob@example.com>"}, {"to": "Ann\n <ann@example.com>"}],
    ids=["subject", "sender", "recipient"],
)
def test_an_email_django_cannot_build_is_unbuildable(raw_server: RawHandler, fields: dict[str, Any]) -> None:
    with pytest.raises(UnbuildableEmail):
        mail.send(mail.build_message(payload(**fields)))
    assert mail.send(mail.build_message(payload())).startswith("250")  # the server is fine
    assert len(raw_server.raw) == 1
