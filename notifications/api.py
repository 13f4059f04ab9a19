"""The public entry point: notify() writes a notification and its outbox row in the
caller's transaction, so the email goes out if and only if that transaction commits."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import validation
from .conf import settings
from .exceptions import InvalidNotification

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
    row: dict[str, Any] = {
        "service": validation.identifier("service", service),
        "notification_id": validation.identifier("notification_id", notification_id),
        "user_id": validation.identifier("user_id", user_id),
        "to": validation.address("to", to),
        "from_email": validation.address("from_email", from_email, required=False),
        "subject": validation.subject(subject),
        "body": validation.body("body", body),
        "html_body": validation.body("html_body", html_body, required=False),
        "metadata": validation.metadata(metadata),
    }
    row["key"] = make_key(row["service"], row["notification_id"], row["user_id"])
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

    Joins the caller's transaction when there is one (its rollback means no email) and
    otherwise commits on its own. A repeat of a key, even from another process at the
    same moment, returns the existing notification and writes nothing.

    Raises ``InvalidNotification`` (a ``ValueError``) naming the field; nothing is written.
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
    """Queue many emails in one transaction and one statement, with ``notify()``'s contract
    for each item. Every item is validated first: one bad item raises and writes nothing
    (the error names its index and field)."""
    rows = []
    for index, item in enumerate(items):
        try:
            rows.append(_clean(**item))
        except InvalidNotification as exc:
            raise InvalidNotification(f"items[{index}].{exc.field}", str(exc).split(": ", 1)[1]) from None
        except TypeError as exc:
            raise InvalidNotification(f"items[{index}]", str(exc)) from None
    return _write(rows, using or settings.DATABASE)


def _write(rows: list[dict[str, Any]], using: str) -> list[Notification]:
    from .models import Notification

    if transaction.get_connection(using).in_atomic_block:
        # In the caller's transaction: a savepoint, so a failure here leaves it usable.
        with transaction.atomic(using=using):
            notifications, created = Notification.objects.create_with_outbox(rows, using)
    else:
        # On its own: the insert is one statement, atomic in autocommit, so no BEGIN and
        # COMMIT round trips.
        notifications, created = Notification.objects.create_with_outbox(rows, using)
    if created and settings.RELAY_ON_COMMIT:
        from .relay import wake_relay_soon

        transaction.on_commit(wake_relay_soon, using=using)  # in autocommit: now
    return notifications
