"""Input checks for notify(): every problem raises InvalidNotification naming the field.

Header fields must never carry CR or LF (header injection); addresses must be single,
valid mailboxes; sizes are bounded so one call cannot flood the outbox.
"""

from __future__ import annotations

import re
from email.headerregistry import Address
from email.utils import getaddresses
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from .conf import settings
from .exceptions import InvalidNotification

MAX_LENGTHS = {"service": 100, "notification_id": 200, "user_id": 200}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAK = re.compile(r"[\r\n\u2028\u2029\x85]")
# An escaped NUL in JSON text: \u0000 after an even number of backslashes (an odd
# number means the backslash itself was escaped, and the text is a literal "\u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def identifier(field: str, value: Any) -> str:
    """service / notification_id / user_id: non-empty text (or an int), bounded,
    without control characters; ':' only in user_id, so the key splits one way."""
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
    if field != "user_id" and ":" in text:
        raise InvalidNotification(field, "must not contain ':' (the key is service:notification_id:user_id)")
    return text


def address(field: str, value: Any, *, required: bool = True) -> str:
    """One mailbox, optionally with a display name: 'a@example.com' or 'Ann <a@example.com>'."""
    if value is None or value == "":
        if required:
            raise InvalidNotification(field, "an email address is required")
        return ""
    if not isinstance(value, str):
        raise InvalidNotification(field, f"must be a string, got {type(value).__name__}")
    if _LINE_BREAK.search(value) or _CONTROL.search(value):
        raise InvalidNotification(field, "must not contain CR, LF or other control characters")
    if len(value) > 320:
        raise InvalidNotification(field, "is longer than 320 characters")
    parsed = getaddresses([value])
    if len(parsed) != 1 or not parsed[0][1]:
        raise InvalidNotification(field, f"{value!r} is not a single email address")
    name, addr = parsed[0]
    try:
        validate_email(addr)
    except ValidationError:
        raise InvalidNotification(field, f"{addr!r} is not a valid email address") from None
    if "@" not in addr or addr.count("@") != 1:
        raise InvalidNotification(field, f"{addr!r} is not a valid email address")
    if name:
        local, domain = addr.split("@")
        # Normalising may quote the display name, so the stored form can be longer.
        addr = str(Address(display_name=name, username=local, domain=domain))
        if len(addr) > 320:
            raise InvalidNotification(field, "is longer than 320 characters once its display name is quoted")
    return addr


def subject(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidNotification("subject", f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidNotification("subject", "must not be empty")
    if _LINE_BREAK.search(value) or _CONTROL.search(value):
        raise InvalidNotification("subject", "must not contain CR, LF or other control characters")
    limit = settings.MAX_SUBJECT_LENGTH
    if len(value) > limit:
        raise InvalidNotification("subject", f"is {len(value)} characters long, the limit is {limit}")
    return value


def body(field: str, value: Any, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidNotification(field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InvalidNotification(field, "must not be empty")
    if "\x00" in value:
        raise InvalidNotification(field, "must not contain NUL characters")
    size = len(value.encode("utf-8", "surrogatepass"))
    limit = settings.MAX_BODY_BYTES
    if size > limit:
        raise InvalidNotification(field, f"is {size} bytes, the limit is {limit} (NOTIFICATIONS_MAX_BODY_BYTES)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNotification(field, "is not valid Unicode text (lone surrogate)") from None
    return value


def metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidNotification("metadata", f"must be a dict, got {type(value).__name__}")
    import json

    try:
        # PostgreSQL's jsonb refuses NaN and Infinity, which json.dumps writes by default.
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidNotification("metadata", f"must be JSON-serializable ({exc})") from None
    if _JSON_NUL.search(encoded):
        raise InvalidNotification("metadata", "must not contain NUL characters")
    if len(encoded) > 64 * 1024:
        raise InvalidNotification("metadata", "is larger than 64 KiB as JSON")
    return value
