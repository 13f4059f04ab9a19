"""Bad input to notify(): an InvalidNotification (a ValueError) that names the field and
says what is wrong, and nothing written. Valid edge cases go through unchanged."""

from __future__ import annotations

import re
from typing import Any

import pytest

from notifications import InvalidNotification, NotificationError, notify
from notifications.models import Notification, OutboxMessage
from notifications.validation import MAX_LENGTHS
from tests.conftest import notification_kwargs

pytestmark = pytest.mark.django_db

MIB = 1024 * 1024
INJECTION = "Ann\r\nBcc: x@y.com <ann@example.com>"


def rejected(field: str, **overrides: Any) -> str:
    """Call notify() with ``overrides``; return the error message after checking that
    it names ``field`` and that no row was written."""
    with pytest.raises(InvalidNotification) as caught:
        notify(**notification_kwargs(**overrides))
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, NotificationError)
    assert error.field == field
    message = str(error)
    assert message.startswith(f"{field}: ")
    assert not Notification.objects.exists()
    assert not OutboxMessage.objects.exists()
    return message


BAD_ADDRESSES = [
    pytest.param("ann.example.com", "not a valid email address", id="no-at"),
    pytest.param("@example.com", "not a valid email address", id="no-local-part"),
    pytest.param("a@x.com, b@x.com", "not a single email address", id="two-comma"),
    pytest.param("a@x.com; b@x.com", "not a single email address", id="two-semicolon"),
    pytest.param("ann@example.com <bob@example.com>", "not a single email address", id="two-angle"),
    pytest.param("a@b@example.com", "not a single email address", id="two-at"),
    pytest.param("", "an email address is required", id="empty"),
    pytest.param(None, "an email address is required", id="none"),
    pytest.param(42, "must be a string, got int", id="int"),
    pytest.param(["ann@example.com"], "must be a string, got list", id="list"),
    pytest.param(b"ann@example.com", "must be a string, got bytes", id="bytes"),
    pytest.param(INJECTION, "must not contain CR, LF", id="crlf-in-display-name"),
    pytest.param("ann@example.com\nBcc: x@y.com", "must not contain CR, LF", id="lf-after-address"),
    pytest.param("ann@example.com\rBcc: x@y.com", "must not contain CR, LF", id="cr-after-address"),
    pytest.param("Ann\x00 <ann@example.com>", "control characters", id="nul"),
    pytest.param("Ann\u2028 <ann@example.com>", "must not contain CR, LF", id="unicode-line-separator"),
    pytest.param("a" * 310 + "@example.com", "longer than 320 characters", id="too-long"),
]


@pytest.mark.parametrize(("value", "problem"), BAD_ADDRESSES)
def test_bad_to_address(value: Any, problem: str) -> None:
    assert problem in rejected("to", to=value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [p for p in BAD_ADDRESSES if p.id not in ("empty", "none")],
)
def test_bad_from_email(value: Any, problem: str) -> None:
    assert problem in rejected("from_email", from_email=value)


def test_address_whose_quoted_display_name_grows_past_the_column_is_rejected() -> None:
    # A display name with parentheses is quoted when normalised, two characters longer
    # than what the caller passed: the limit applies to what would be stored.
    name = "Ann (billing) " + "x" * 288
    value = f"{name} <ann@example.com>"
    assert len(value) == 320
    assert "longer than 320 characters" in rejected("to", to=value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Hello\r\nBcc: x@y.com", id="crlf"),
        pytest.param("Hello\nworld", id="lf"),
        pytest.param("Hello\rworld", id="cr"),
        pytest.param("Hello\x00", id="nul"),
        pytest.param("Hello\x1b[31m", id="escape"),
        pytest.param("Hello\x7f", id="del"),
        pytest.param("Hello\u2028world", id="unicode-line-separator"),
        pytest.param("Hello\x85world", id="next-line"),
    ],
)
def test_control_characters_in_subject(value: str) -> None:
    assert "must not contain CR, LF or other control characters" in rejected("subject", subject=value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param("   ", "must not be empty", id="blank"),
        pytest.param(None, "is required (or give a template)", id="none"),
        pytest.param(7, "must be a string, got int", id="int"),
        pytest.param("x" * 999, "is 999 characters long, the limit is 998", id="too-long"),
    ],
)
def test_bad_subject(value: Any, problem: str) -> None:
    assert problem in rejected("subject", subject=value)


@pytest.mark.parametrize("field", ["service", "notification_id", "user_id"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param("  ", "must not be empty", id="blank"),
        pytest.param(None, "must be a string, got NoneType", id="none"),
        pytest.param(1.5, "must be a string, got float", id="float"),
        pytest.param(True, "must be a string, got bool", id="bool"),
        pytest.param("a\r\nb", "must not contain control characters or line breaks", id="crlf"),
        pytest.param("a\tb", "must not contain control characters or line breaks", id="tab"),
        pytest.param("a\x00b", "must not contain control characters or line breaks", id="nul"),
    ],
)
def test_bad_identifier(field: str, value: Any, problem: str) -> None:
    assert problem in rejected(field, **{field: value})


@pytest.mark.parametrize("field", ["service", "notification_id", "user_id"])
def test_identifier_over_its_limit(field: str) -> None:
    limit = MAX_LENGTHS[field]
    assert limit == {"service": 100, "notification_id": 200, "user_id": 200}[field]
    message = rejected(field, **{field: "x" * (limit + 1)})
    assert f"is {limit + 1} characters long, the limit is {limit}" in message


def test_identifiers_at_their_limits_are_accepted() -> None:
    n = notify(
        **notification_kwargs(
            service="s" * MAX_LENGTHS["service"],
            notification_id="n" * MAX_LENGTHS["notification_id"],
            user_id="u" * MAX_LENGTHS["user_id"],
        )
    )
    stored = Notification.objects.get(pk=n.pk)
    assert stored.key == f"{'s' * 100}:{'n' * 200}:{'u' * 200}"


@pytest.mark.parametrize("field", ["service", "notification_id"])
def test_colon_in_service_or_notification_id(field: str) -> None:
    message = rejected(field, **{field: "billing:invoice"})
    assert "must not contain ':'" in message


def test_body_over_the_default_limit_of_one_mib() -> None:
    message = rejected("body", body="x" * (MIB + 1))
    assert f"is {MIB + 1} bytes, the limit is {MIB} (NOTIFICATIONS_MAX_BODY_BYTES)" in message


def test_body_of_exactly_one_mib_is_stored_whole() -> None:
    n = notify(**notification_kwargs(body="x" * MIB))
    assert len(Notification.objects.get(pk=n.pk).body) == MIB


def test_body_limit_is_configurable(settings: Any) -> None:
    settings.NOTIFICATIONS_MAX_BODY_BYTES = 100
    message = rejected("body", body="x" * 101)
    assert "is 101 bytes, the limit is 100 (NOTIFICATIONS_MAX_BODY_BYTES)" in message
    # The limit counts UTF-8 bytes, not characters: 51 characters, 102 bytes.
    assert "is 102 bytes, the limit is 100" in rejected("body", body="é" * 51)
    n = notify(**notification_kwargs(body="x" * 100))
    assert Notification.objects.get(pk=n.pk).body == "x" * 100


def test_html_body_over_the_limit(settings: Any) -> None:
    settings.NOTIFICATIONS_MAX_BODY_BYTES = 100
    message = rejected("html_body", html_body="<p>" + "x" * 100 + "</p>")
    assert "is 107 bytes, the limit is 100 (NOTIFICATIONS_MAX_BODY_BYTES)" in message


@pytest.mark.parametrize("field", ["body", "html_body"])
def test_nul_in_body(field: str) -> None:
    assert "must not contain NUL characters" in rejected(field, **{field: "Hello\x00Ann"})


@pytest.mark.parametrize("field", ["body", "html_body"])
def test_lone_surrogate_in_body(field: str) -> None:
    assert "not valid Unicode text" in rejected(field, **{field: "Hello \ud800"})


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param(" \n ", "must not be empty", id="blank"),
        pytest.param(None, "is required (or give a template)", id="none"),
        pytest.param(b"Hello", "must be a string, got bytes", id="bytes"),
    ],
)
def test_bad_body(value: Any, problem: str) -> None:
    assert problem in rejected("body", body=value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param([("a", 1)], "must be a dict, got list", id="list"),
        pytest.param("a=1", "must be a dict, got str", id="str"),
        pytest.param(1, "must be a dict, got int", id="int"),
        pytest.param({"ids": {1, 2}}, "must be JSON-serializable", id="set-value"),
        pytest.param({"ratio": float("nan")}, "must be JSON-serializable", id="nan"),
        pytest.param({"ratio": float("inf")}, "must be JSON-serializable", id="infinity"),
        pytest.param({"note": "a\x00b"}, "must not contain NUL characters", id="nul"),
        pytest.param({"note": "x" * 70_000}, "larger than 64 KiB", id="too-large"),
    ],
)
def test_bad_metadata(value: Any, problem: str) -> None:
    assert problem in rejected("metadata", metadata=value)


def test_missing_keyword_argument_is_a_type_error_naming_it() -> None:
    kwargs = notification_kwargs()
    del kwargs["to"]
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'to'"):
        notify(**kwargs)
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


def test_positional_or_unknown_arguments_are_type_errors() -> None:
    kwargs = notification_kwargs()
    with pytest.raises(TypeError, match="positional"):
        notify(*kwargs.values())  # type: ignore[misc, call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'cc'"):
        notify(**kwargs, cc="bob@example.com")  # type: ignore[call-arg]
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


# Valid edge cases: accepted, stored as given (or in their normalised form).


def test_display_name_is_kept() -> None:
    n = notify(**notification_kwargs(to="Ann Example <ann@example.com>", from_email="Billing <bill@example.com>"))
    stored = Notification.objects.get(pk=n.pk)
    assert stored.to == "Ann Example <ann@example.com>"
    assert stored.from_email == "Billing <bill@example.com>"


def test_display_name_that_needs_quotes_keeps_them() -> None:
    n = notify(**notification_kwargs(to='"Example, Ann" <ann@example.com>'))
    assert Notification.objects.get(pk=n.pk).to == '"Example, Ann" <ann@example.com>'


def test_int_ids_become_text_in_the_key() -> None:
    n = notify(**notification_kwargs(service="svc", notification_id="id", user_id=42))
    stored = Notification.objects.get(pk=n.pk)
    assert stored.key == "svc:id:42" and stored.user_id == "42"
    assert notify(**notification_kwargs(service="svc", notification_id=7, user_id=0)).key == "svc:7:0"


def test_user_id_may_contain_colons() -> None:
    n = notify(**notification_kwargs(service="svc", notification_id="id", user_id="tenant:42"))
    assert Notification.objects.get(pk=n.pk).key == "svc:id:tenant:42"


def test_unicode_subject_and_body() -> None:
    subject = "Ihre Rechnung für März ✓ — 請求書"
    body = "Grüße, Ann 👋"
    n = notify(**notification_kwargs(subject=subject, body=body, html_body=f"<p>{body}</p>"))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.subject, stored.body, stored.html_body) == (subject, body, f"<p>{body}</p>")


def test_metadata_is_stored_as_given() -> None:
    metadata = {"invoice": 17, "tags": ["a", "b"], "path": "C:\\u0000", "nested": {"ok": True}}
    n = notify(**notification_kwargs(metadata=metadata))
    assert Notification.objects.get(pk=n.pk).metadata == metadata


def test_optional_fields_default_to_empty() -> None:
    n = notify(**notification_kwargs(from_email=None, html_body=None, metadata=None))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.from_email, stored.html_body, stored.metadata) == ("", "", {})


# Lone surrogates: not text, so neither PostgreSQL nor a mail server could take them.


@pytest.mark.parametrize("field", ["subject", "service", "notification_id", "user_id"])
def test_lone_surrogate_in_a_text_field(field: str) -> None:
    """Finding: a lone surrogate in these fields raised UnicodeEncodeError from psycopg,
    not InvalidNotification naming the field."""
    assert "not valid Unicode text" in rejected(field, **{field: "Hello \ud800"})


@pytest.mark.parametrize("field", ["to", "from_email"])
def test_lone_surrogate_in_a_display_name(field: str) -> None:
    """Finding: a lone surrogate in an address's display name raised UnicodeEncodeError."""
    assert "not valid Unicode text" in rejected(field, **{field: "Ann \udfff <ann@example.com>"})


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"note": "a\ud800b"}, id="value"),
        pytest.param({"a\udc00": 1}, id="key"),
        pytest.param({"deep": [{"x": ["ok", "\ud83d"]}]}, id="nested"),
        # Two surrogates that would form an emoji as UTF-16 are still two code points
        # here; jsonb would join them into one character, another value.
        pytest.param({"note": "\ud83d\ude00"}, id="surrogate-pair"),
    ],
)
def test_lone_surrogate_in_metadata(value: Any) -> None:
    """Finding: a lone surrogate in metadata (key or value, at any depth) reached
    PostgreSQL, which refused the jsonb with a DataError."""
    assert "not valid Unicode text" in rejected("metadata", metadata=value)


def test_astral_characters_are_text() -> None:
    text = "Grüße 😀 𝄞"
    n = notify(**notification_kwargs(subject=text, user_id=text, to=f"{text} <ann@example.com>", metadata={text: text}))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.subject, stored.user_id, stored.metadata) == (text, text, {text: text})
    assert stored.to == f"{text} <ann@example.com>"


# Addresses the mail server could be aimed with, or that could not be sent.


@pytest.mark.parametrize("field", ["to", "from_email"])
@pytest.mark.parametrize(
    "value",
    [
        "ann@[10.0.0.1]",
        "ann@[127.0.0.1]",
        "ann@[IPv6:::1]",
        "ann@[IPv6:2001:db8::1]",
        "Ann <ann@[192.168.0.1]>",
    ],
)
def test_domain_literals_are_refused(field: str, value: str) -> None:
    """Finding: 'a@[10.0.0.1]' was accepted, and it makes the mail server deliver to a
    host of the caller's choosing (an internal one)."""
    assert "domain literals are not accepted" in rejected(field, **{field: value})


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # Valid to Django's validator, but its label is too long once IDNA-encoded.
        pytest.param("ann@" + "ü" * 60 + ".de", "cannot be encoded for sending", id="idna-label-too-long"),
        # Python's IDNA 2003 codec maps these to other names: the email would go elsewhere.
        pytest.param("ann@faße.de", "would be sent as 'fasse.de', another domain", id="sharp-s"),
        pytest.param("ann@a\u200db.example", "would be sent as 'ab.example'", id="zero-width-joiner"),
        pytest.param("ann@\u2163.example", "would be sent as 'iv.example'", id="roman-numeral"),
    ],
)
def test_domains_that_django_cannot_send_as_given(value: str, problem: str) -> None:
    """Finding: notify() accepted addresses whose domain Django's email code
    (sanitize_address, at send time) fails to encode, or encodes as another domain."""
    assert problem in rejected("to", to=value)


def test_internationalised_domains_are_kept() -> None:
    n = notify(**notification_kwargs(to="Ann <ann@bücher.de>", from_email="billing@ÜBER.example"))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.to, stored.from_email) == ("Ann <ann@bücher.de>", "billing@ÜBER.example")


# The size of a notification in a broker message.


def test_json_escaping_counts_for_the_message_size() -> None:
    """Finding: body and html_body may each be 1 MiB of UTF-8, but kombu escapes every
    non-ASCII character in the broker message (ensure_ascii): 1 MiB of 'é' is 3 MiB
    there, so a notification could be far larger than the broker's message limit."""
    from notifications.conf import DEFAULTS

    assert DEFAULTS["MAX_MESSAGE_BYTES"] == 4 * MIB
    message = rejected("html_body", body="x" * MIB, html_body="é" * (MIB // 2))
    assert "the notification would be 4194" in message  # 1 MiB + 3 MiB and the rest
    assert "more than the 4190208 that NOTIFICATIONS_MAX_MESSAGE_BYTES (4194304) leaves" in message
    assert "html_body is 3145730 bytes of it" in message


def test_astral_characters_are_twelve_bytes_in_the_message() -> None:
    assert "body is 3145730 bytes of it" in rejected("body", body="😀" * (MIB // 4), html_body="x" * MIB)


def test_two_bodies_of_one_mib_of_ascii_fit() -> None:
    n = notify(**notification_kwargs(body="x" * MIB, html_body="y" * MIB))
    assert Notification.objects.filter(pk=n.pk).exists()


def test_message_size_limit_is_configurable(settings: Any) -> None:
    settings.NOTIFICATIONS_MAX_MESSAGE_BYTES = 20_000
    assert "(20000) leaves" in rejected("body", body="x" * 16_000)
    settings.NOTIFICATIONS_MAX_MESSAGE_BYTES = 8 * MIB
    notify(**notification_kwargs(body="x" * MIB, html_body="é" * (MIB // 2)))


@pytest.mark.django_db(transaction=True)
def test_message_size_is_what_the_relay_publishes(settings: Any) -> None:
    """notify()'s measure is the relay's: a notification refused one character over the
    limit is accepted at it, and the relay publishes exactly that many bytes of JSON
    (jsonb writes 1e-07 as 0.0000001: that counts too)."""
    import json

    from notifications.relay import relay_batch
    from notifications.validation import MESSAGE_OVERHEAD
    from tests.conftest import take_delivery_payloads

    settings.NOTIFICATIONS_MAX_MESSAGE_BYTES = 24_000
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    limit = 24_000 - MESSAGE_OVERHEAD
    kwargs = notification_kwargs(subject="Grüße 😀", metadata={"tiny": 1e-07, "name": "Zoë", "n": [1, 2.5]})
    with pytest.raises(InvalidNotification) as caught:
        notify(**{**kwargs, "body": "é" * 4000})
    size = int(re.search(r"would be (\d+) bytes", str(caught.value)).group(1))
    fitting = 4000 - (size - limit + 5) // 6  # each 'é' is 6 bytes escaped
    with pytest.raises(InvalidNotification):
        notify(**{**kwargs, "body": "é" * (fitting + 1)})
    assert not Notification.objects.exists()
    notify(**{**kwargs, "body": "é" * fitting})
    take_delivery_payloads()
    assert relay_batch() == 1
    [[payload]] = take_delivery_payloads()
    published = len(json.dumps(payload)) + 2  # as the relay packs it: ", " in the list
    assert limit - 6 < published <= limit


# What the property tests (test_properties.py) found.


@pytest.mark.parametrize("field", ["body", "html_body"])
@pytest.mark.parametrize("separator", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\u2029"])
def test_long_line_broken_only_by_characters_smtp_does_not_break_at(field: str, separator: str) -> None:
    """Found by the properties: a line over 998 bytes between CR/LF, cut into shorter
    pieces by form feeds or Unicode line separators, was accepted; Django's email code
    counts those as line ends, so it sent the line unwrapped, and the mail server
    refused it for good (500 Line too long): the notification ended failed."""
    value = separator.join(["x" * 600] * 3)
    message = rejected(field, **{field: value})
    assert f"has a line of {len(value.encode())} bytes between line breaks" in message


def test_long_lines_that_django_wraps_are_accepted() -> None:
    # Longer than 998 bytes as splitlines() sees it: quoted-printable, which wraps.
    n = notify(**notification_kwargs(body="x" * 2000 + "\x0c" + "y" * 10, html_body="<p>" + "é" * 3000 + "</p>"))
    assert len(Notification.objects.get(pk=n.pk).body) == 2011
    # Short lines between line breaks: sent as they are.
    notify(**notification_kwargs(body="\n".join(["x" * 600 + "\x0c"] * 3)))


def test_subject_is_stored_without_surrounding_whitespace() -> None:
    """Found by the properties: a subject ending (or starting) with whitespace arrived
    without it, as mail parsers strip a header's surrounding whitespace; the stored
    subject was not what arrived. notify() stores it stripped, so repeats compare equal."""
    n = notify(**notification_kwargs(subject="  Your invoice\u3000 "))
    assert Notification.objects.get(pk=n.pk).subject == "Your invoice"
    again = notify(**notification_kwargs(notification_id=n.notification_id, subject="Your invoice "))
    assert again.pk == n.pk


@pytest.mark.parametrize("value", ["=?utf-8?q?Hello?=", "Re: =?ISO-8859-1?B?SGk=?= there"])
def test_ascii_subject_with_an_encoded_word(value: str) -> None:
    """Found by the properties: an ASCII subject containing '=?utf-8?q?x?=' is sent as
    it is, and arrives decoded ('x'): not what the caller wrote."""
    assert "would decode as an encoded word (RFC 2047)" in rejected("subject", subject=value)


def test_non_ascii_subject_with_an_encoded_word_is_sent_encoded_whole() -> None:
    n = notify(**notification_kwargs(subject="Grüße =?utf-8?q?x?="))
    assert Notification.objects.get(pk=n.pk).subject == "Grüße =?utf-8?q?x?="


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        pytest.param('""@example.com', "'@example.com'", id="empty-quoted"),
        pytest.param('"."@example.com', "'.@example.com'", id="quoted-dot"),
        pytest.param('Zoë <""@example.com>', "'@example.com'", id="with-display-name"),
    ],
)
def test_quoted_local_parts_django_would_send_unquoted(value: str, sent: str) -> None:
    """Found by the properties: '""@example.com' passes Django's validator, but its email
    code rebuilds the local part without the quotes and sends '@example.com', which the
    mail server refuses (553 malformed address): the notification ended failed."""
    assert f"would be sent as {sent}, not a valid address" in rejected("to", to=value)


def test_quoted_local_part_with_a_display_name_is_not_quoted_twice() -> None:
    """Found by the properties: with a display name, the normalised address took the
    quoted local part as a bare name and quoted it again: 'Zoe <"a,b"@example.com>' was
    stored and sent as 'Zoe <"\\"a,b\\""@example.com>', another mailbox."""
    n = notify(**notification_kwargs(to='Zoe <"a,b"@example.com>', from_email='Bill <"a\\"b"@example.com>'))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.to, stored.from_email) == ('Zoe <"a,b"@example.com>', 'Bill <"a\\"b"@example.com>')


def test_quoted_local_parts_that_survive_are_kept() -> None:
    n = notify(**notification_kwargs(to='"a,b"@example.com'))
    assert Notification.objects.get(pk=n.pk).to == '"a,b"@example.com'


@pytest.mark.parametrize(
    "value",
    [
        pytest.param('Zoë <":"@example.com>', id="non-ascii-display-name"),
        pytest.param('"a,b"@bücher.de', id="idn-domain"),
    ],
)
def test_quoted_local_part_with_non_ascii_text(value: str) -> None:
    """Found by the properties: Django builds a non-ASCII address header from
    (name, addr-spec) pairs and quotes the quoted local part again, so the email
    arrived with 'From: Zoë <"\\":\\""@example.com>', another mailbox than the one the
    envelope went to."""
    assert "a quoted local part cannot go with non-ASCII text" in rejected("to", to=value)


def test_needless_quotes_in_a_local_part_are_dropped() -> None:
    # As Django's email code sends it: the same mailbox.
    n = notify(**notification_kwargs(to='"ann"@bücher.de', from_email='Zoë <"bill"@example.com>'))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.to, stored.from_email) == ("ann@bücher.de", "Zoë <bill@example.com>")


@pytest.mark.parametrize("field", ["service", "notification_id", "user_id"])
@pytest.mark.parametrize("value", [" billing", "billing ", "billing\u3000", "\xa0billing"])
def test_identifier_with_surrounding_whitespace(field: str, value: str) -> None:
    """Found by the properties: service ' 0' made the key ' 0:0:0', and the email's
    X-Notification-Key header arrived as '0:0:0' (mail software drops a header's
    surrounding whitespace): the key in the email was not the notification's."""
    assert "must not begin or end with whitespace" in rejected(field, **{field: value})


def test_identifier_with_inner_whitespace_is_kept() -> None:
    n = notify(**notification_kwargs(service="billing eu", notification_id="invoice 7", user_id="Ann Example"))
    assert Notification.objects.get(pk=n.pk).key == "billing eu:invoice 7:Ann Example"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"user_id": "=?utf-8?q?x?="}, "user_id", id="in-one-id"),
        pytest.param({"notification_id": "=?utf-8?q?a", "user_id": "b?="}, "notification_id", id="across-ids"),
    ],
)
def test_key_with_an_encoded_word(overrides: dict[str, str], field: str) -> None:
    """Found by the properties: user_id '=?utf-8?q?x?=' made the key '0:0:=?utf-8?q?x?=',
    and the email's X-Notification-Key header arrived decoded, as '0:0:x'."""
    assert "as an encoded word (RFC 2047) in its X-Notification-Key header" in rejected(field, **overrides)


@pytest.mark.parametrize("value", [1e23, 7.205759403792229e16, -1.7976931348623157e308])
def test_float_that_jsonb_would_return_as_another_number(value: float) -> None:
    """Found by the properties (a check written for it, confirmed by them): jsonb keeps
    numbers as numeric, which has no exponent, so 1e+23 came back to the worker as the
    integer 10**23, which is not the float 1e+23: the metadata changed on the way."""
    message = rejected("metadata", metadata={"n": value})
    assert f"the number {value!r} would come back from PostgreSQL's jsonb as" in message


def test_floats_that_survive_jsonb_are_accepted() -> None:
    n = notify(**notification_kwargs(metadata={"exact": 1e16, "tiny": 1e-300, "plain": 2.5}))
    stored = Notification.objects.get(pk=n.pk).metadata
    assert stored == {"exact": 1e16, "tiny": 1e-300, "plain": 2.5}
    assert stored["exact"] == 10**16  # an integer now, of the same value


def test_metadata_size_counts_numbers_as_jsonb_writes_them() -> None:
    # 1e-300 is 6 characters in Python's JSON and 302 in jsonb's (0.000...1).
    assert "larger than 64 KiB as JSON" in rejected("metadata", metadata={"tiny": [1e-300] * 250})


@pytest.mark.parametrize("field", ["to", "from_email"])
def test_display_name_with_an_encoded_word(field: str) -> None:
    """Found by the properties: an ASCII display name '=?utf-8?b?IMKg?=' is stored and
    sent as written, and mail programs show it decoded. Give the name as text: Django
    encodes a non-ASCII one itself."""
    message = rejected(field, **{field: "=?utf-8?b?IMKg?= <ann@example.com>"})
    assert "would decode as an encoded word (RFC 2047)" in message


def test_display_name_whitespace_is_stored_as_it_arrives() -> None:
    """Found by the properties: a display name with runs of whitespace or non-breaking
    spaces ('\\xa0 \\xa0') arrived with other whitespace than was stored; it is stored
    with single spaces between its words."""
    n = notify(**notification_kwargs(to="Ann\xa0  Example\u3000 <ann@example.com>", from_email="\xa0 <b@example.com>"))
    stored = Notification.objects.get(pk=n.pk)
    assert (stored.to, stored.from_email) == ("Ann Example <ann@example.com>", "b@example.com")


def _simple_looking_addresses() -> Any:
    from hypothesis import strategies as st

    word = st.text(st.sampled_from("abcXYZ019.'-_%+"), min_size=1, max_size=12)
    label = st.text(st.sampled_from("abcXYZ019-"), min_size=1, max_size=70)
    spec = st.builds(lambda local, labels: f"{local}@{'.'.join(labels)}", word, st.lists(label, min_size=1, max_size=4))
    name = st.lists(word, min_size=1, max_size=40).map(" ".join)
    return st.one_of(spec, st.builds(lambda n, s: f"{n} <{s}>", name, spec))


def _outcome(check: Any, value: str) -> Any:
    try:
        return check("to", value)
    except InvalidNotification as exc:
        return ("refused", str(exc))


def test_common_addresses_take_a_quick_path_that_agrees_with_the_full_checks() -> None:
    """notify()'s address checks run email's header parser (about 0.2 ms an address);
    plain ASCII addresses skip it, and must come out exactly as the full checks say."""
    from hypothesis import given

    from notifications import validation

    def without_quick_path(field: str, value: str) -> str:
        quick, validation._SIMPLE_ADDRESS = validation._SIMPLE_ADDRESS, re.compile("(?!)")
        try:
            return validation.address(field, value)
        finally:
            validation._SIMPLE_ADDRESS = quick

    @given(value=_simple_looking_addresses())
    def agrees(value: str) -> None:
        assert _outcome(validation.address, value) == _outcome(without_quick_path, value)

    agrees()
    assert validation._SIMPLE_ADDRESS.fullmatch("Ann J. O'Brien-Smith <ann.o-b+x@mail.example.com>")
    assert validation.address("to", "Ann J. Smith <ann@example.com>") == '"Ann J. Smith" <ann@example.com>'
