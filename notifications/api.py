"""The public entry point: notify() writes a notification and its outbox row in the
caller's transaction, so the email goes out if and only if that transaction commits."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import events, validation
from .conf import settings
from .exceptions import InvalidNotification, NotificationConflict

if TYPE_CHECKING:
    from .models import Notification

logger = logging.getLogger(__name__)


def make_key(service: str, notification_id: str, user_id: str) -> str:
    return f"{service}:{notification_id}:{user_id}"


def _clean(
    *,
    service: Any,
    notification_id: Any,
    user_id: Any,
    to: Any,
    subject: Any,
    body: Any,
    html_body: Any = None,
    from_email: Any = None,
    metadata: Any = None,
) -> dict[str, Any]:
    meta = validation.metadata(metadata)
    row: dict[str, Any] = {
        "service": validation.identifier("service", service),
        "notification_id": validation.identifier("notification_id", notification_id),
        "user_id": validation.identifier("user_id", user_id),
        "to": validation.address("to", to),
        "from_email": validation.address("from_email", from_email, required=False),
        "subject": validation.subject(subject),
        "body": validation.body("body", body),
        "html_body": validation.body("html_body", html_body, required=False),
        "metadata": meta.value,
    }
    row["key"] = validation.key(row["service"], row["notification_id"], row["user_id"])
    validation.message_size(row, meta)
    return row


def notify(
    *,
    service: str,
    notification_id: str | int,
    user_id: str | int,
    to: str,
    subject: str,
    body: str,
    html_body: str | None = None,
    from_email: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    using: str | None = None,
) -> Notification:
    """Queue one email, exactly once per ``service:notification_id:user_id``.

    Joins the caller's transaction when there is one, an atomic block or manual
    transaction management (``set_autocommit(False)``): its rollback means no email.
    Otherwise it commits on its own. A repeat of a key with the same content, even from
    another process at the same moment, returns the existing notification and writes
    nothing.

    Raises ``InvalidNotification`` (a ``ValueError``) naming the field, and
    ``NotificationConflict`` (one of those) when the key exists with different content
    (unless ``NOTIFICATIONS_KEY_REUSE = "return"``); nothing is written.
    """
    row = _clean(
        service=service,
        notification_id=notification_id,
        user_id=user_id,
        to=to,
        subject=subject,
        body=body,
        html_body=html_body,
        from_email=from_email,
        metadata=metadata,
    )
    return _write([row], using or settings.DATABASE)[0]


def notify_many(items: Iterable[Mapping[str, Any]], *, using: str | None = None) -> list[Notification]:
    """Queue many emails in one transaction, with ``notify()``'s contract for each item;
    the notifications come back in the order of ``items``.

    Every item is validated first: one bad item raises and writes nothing (the error
    names its index and field), as does a key used twice with different content, here or
    by an existing notification (``NotificationConflict``). At most
    ``NOTIFICATIONS_MAX_BATCH_ITEMS`` items (else ``InvalidNotification`` naming
    ``items``). Rows are inserted in key order, so overlapping calls never deadlock.
    """
    limit = int(settings.MAX_BATCH_ITEMS)
    rows = []
    for index, item in enumerate(items):
        if index >= limit:
            raise InvalidNotification(
                "items", f"more than {limit} items in one call (NOTIFICATIONS_MAX_BATCH_ITEMS); split them"
            )
        try:
            rows.append(_clean(**item))
        except InvalidNotification as exc:
            raise InvalidNotification(f"items[{index}].{exc.field}", str(exc).split(": ", 1)[1]) from None
        except TypeError as exc:
            raise InvalidNotification(f"items[{index}]", str(exc)) from None
    unique, positions = _collapse(rows)
    try:
        written = _write(unique, using or settings.DATABASE, repeats=len(rows) - len(unique))
    except NotificationConflict as exc:
        index = next(i for i, row in enumerate(rows) if row["key"] == exc.key)
        raise NotificationConflict(f"items[{index}].{exc.field}", exc.key, exc.fields) from None
    return [written[p] for p in positions]


def _collapse(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """One row per key (the first), and for each row its position among them. A key
    given twice with different content is a conflict, as it would be across calls."""
    from .managers import differences

    unique: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    positions: list[int] = []
    for index, row in enumerate(rows):
        at = seen.get(row["key"])
        if at is None:
            at = seen[row["key"]] = len(unique)
            unique.append(row)
        elif settings.KEY_REUSE != "return":
            fields = differences(row, unique[at])
            if fields:
                raise NotificationConflict(f"items[{index}].{fields[0]}", row["key"], fields)
        positions.append(at)
    return unique, positions


def _write(rows: list[dict[str, Any]], using: str, repeats: int = 0) -> list[Notification]:
    """Insert ``rows`` (``repeats``: items of the call folded into them, for the counts)."""
    from .models import Notification
    from .relay import databases

    if using not in databases():
        # Rows in a database the relay does not publish would wait for ever.
        raise InvalidNotification(
            "using",
            f"{using!r} is not a database the relay publishes; add it to NOTIFICATIONS_RELAY_DATABASES "
            f"(now {databases()!r})",
        )

    # Decided before anything is written: where the rows go, and how the relay hears.
    connection = transaction.get_connection(using)
    in_block = connection.in_atomic_block
    manual = not in_block and not connection.get_autocommit()
    if in_block or manual or len(rows) > 1:
        # A savepoint in the caller's transaction (an atomic block, or one it manages by
        # hand), so a failure here leaves it usable; else a transaction of its own, so
        # a bad or conflicting item of a batch writes nothing.
        with transaction.atomic(using=using):
            notifications, created = Notification.objects.create_with_outbox(rows, using)
    else:
        # One row on its own: the insert is one statement, atomic in autocommit, so no
        # BEGIN and COMMIT round trips.
        notifications, created = Notification.objects.create_with_outbox(rows, using)
    if in_block:  # counted once the caller's transaction commits; never if it rolls back
        transaction.on_commit(lambda: events.created(notifications, created, repeats), using=using, robust=True)
    else:  # committed already (under manual transaction management: counted now)
        events.created(notifications, created, repeats)
    if created and settings.RELAY_ON_COMMIT:
        from .relay import wake_relay_soon

        if in_block:
            transaction.on_commit(wake_relay_soon, using=using)
        elif not manual:
            wake_relay_soon()  # committed already
        # Under manual transaction management Django has no on-commit hook: beat's
        # periodic relay pass publishes the rows once the caller commits.
    return notifications
