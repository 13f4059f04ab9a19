"""The public entry point: notify() writes a notification and its outbox row in the
caller's transaction, so the email goes out if and only if that transaction commits."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.utils import timezone

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
    subject: Any = None,
    body: Any = None,
    html_body: Any = None,
    from_email: Any = None,
    metadata: Any = None,
    template: Any = None,
    context: Any = None,
    language: Any = None,
    send_at: Any = None,
    expires_at: Any = None,
    priority: Any = None,
    backend: Any = None,
    using: str | None = None,
) -> dict[str, Any]:
    meta = validation.metadata(metadata)
    lang = validation.language(language)
    if template is not None:
        from . import rendering

        if subject is not None or body is not None or html_body is not None:
            raise InvalidNotification("template", "give either a template or subject and body, not both")
        rendered = rendering.render(template, context, lang, using or settings.DATABASE)
        subject, body, html_body = rendered.subject, rendered.body, rendered.html_body
    elif context is not None:
        raise InvalidNotification("context", "is only used with a template")
    elif subject is None or body is None:
        raise InvalidNotification("subject" if subject is None else "body", "is required (or give a template)")
    when = validation.moment("send_at", send_at)
    until = validation.moment("expires_at", expires_at)
    validation.schedule(when, until)
    row: dict[str, Any] = {
        "service": validation.identifier("service", service),
        "notification_id": validation.identifier("notification_id", notification_id),
        "user_id": validation.identifier("user_id", user_id),
        "to": validation.address("to", to),
        "from_email": validation.address("from_email", from_email, required=False),
        "subject": _rendered("subject", template, validation.subject, subject),
        "body": _rendered("body", template, lambda v: validation.body("body", v), body),
        "html_body": _rendered(
            "html_body", template, lambda v: validation.body("html_body", v, required=False), html_body
        ),
        "metadata": meta.value,
        "template": rendering_name(template),
        "language": lang if template is not None else "",
        "send_at": when,
        "expires_at": until,
        "priority": validation.priority(priority),
        "backend": validation.backend(backend),
    }
    row["key"] = validation.key(row["service"], row["notification_id"], row["user_id"])
    validation.message_size(row, meta)
    return row


def _existing_rendering(
    exc: InvalidNotification,
    template: Any,
    language: Any,
    service: Any,
    notification_id: Any,
    user_id: Any,
    using: str | None,
) -> Notification | None:
    """A repeat of a templated notify() whose template can no longer be rendered (deleted
    or broken since): the notification of its key, rendered from the same template, if it
    exists. A caller retrying after an unclear commit learns that its email was queued,
    rather than that it was refused."""
    from .models import Notification

    if exc.field != "template" or not isinstance(template, str):
        return None
    try:
        key = validation.key(
            validation.identifier("service", service),
            validation.identifier("notification_id", notification_id),
            validation.identifier("user_id", user_id),
        )
    except InvalidNotification:
        return None
    found = Notification.objects.using(using or settings.DATABASE).filter(key=key).first()
    if found is None or found.template != template or found.language != (language or ""):
        return None
    return found


def rendering_name(template: Any) -> str:
    return str(template) if template is not None else ""


def _rendered(field: str, template: Any, check: Any, value: Any) -> Any:
    """A field's check; what a template rendered wrong is the template's error, named so."""
    try:
        return check(value)
    except InvalidNotification as exc:
        if template is None:
            raise
        why = str(exc).split(": ", 1)[-1]
        raise InvalidNotification("template", f"{template!r} rendered a {field} that {why}") from None


def notify(
    *,
    service: str,
    notification_id: str | int,
    user_id: str | int,
    to: str,
    subject: str | None = None,
    body: str | None = None,
    html_body: str | None = None,
    from_email: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    template: str | None = None,
    context: Mapping[str, Any] | None = None,
    language: str | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    priority: str | None = None,
    backend: str | None = None,
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

    ``template`` (with ``context`` and ``language``) renders subject and bodies here,
    from the caller's template files or the database's templates (``rendering``), so
    the message carries the whole email. ``send_at`` (aware) is the earliest send,
    ``expires_at`` the latest; ``priority="high"`` overtakes a backlog; ``backend``
    names an entry of ``NOTIFICATIONS_BACKENDS``.
    """
    try:
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
            template=template,
            context=context,
            language=language,
            send_at=send_at,
            expires_at=expires_at,
            priority=priority,
            backend=backend,
            using=using,
        )
    except InvalidNotification as exc:
        existing = _existing_rendering(exc, template, language, service, notification_id, user_id, using)
        if existing is None:
            raise
        return existing
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
            rows.append(_clean(**item, using=using))
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
    if created and settings.RELAY_ON_COMMIT and settings.RELAY_WAKEUP == "redis":
        # ("listen": the insert itself notified the relay, delivered on commit; "poll":
        # the relay looks on its own.)
        from .relay import wake_relay_soon

        if in_block:
            transaction.on_commit(wake_relay_soon, using=using)
        elif not manual:
            wake_relay_soon()  # committed already
        # Under manual transaction management Django has no on-commit hook: beat's
        # periodic relay pass publishes the rows once the caller commits.
    return notifications


@dataclass(frozen=True)
class Cancellation:
    """What ``cancel()`` did. True (as a bool) when it was in time: no email was sent, and
    none will be."""

    key: str
    cancelled: bool  # nothing more will be sent for this key
    in_time: bool  # ... and nothing was (False: it was sent, or may have reached the mail server)
    status: str  # the notification's status now ("unknown": no notification has this key)

    def __bool__(self) -> bool:
        return self.in_time


def cancel(key: str, *, reason: str = "cancelled", using: str | None = None) -> Cancellation:
    """Stop the notification of ``key`` (``service:notification_id:user_id``) if it has not
    been sent; say whether that was in time.

    Decided where the workers record their claims (``NOTIFICATIONS_DATABASE`` of the
    notification service): a cancel that meets a worker about to send wins or loses on
    the claim row, never both. A cancel while the email is being handed over is too late
    for it. Joins the caller's transaction: its rollback undoes the cancel.
    """
    from .managers import SentEmailManager
    from .models import FINISHED_STATUSES, Notification, OutboxMessage, SentEmail, Status

    if not isinstance(key, str) or not key:
        raise InvalidNotification("key", "must be a notification key, service:notification_id:user_id")
    db = using or settings.DATABASE
    why = validation.body("reason", reason)[:500]
    with transaction.atomic(using=db):
        notification = Notification.objects.using(db).filter(key=key).only("id", "status").first()
        if notification is None:
            return Cancellation(key, False, False, "unknown")
        if notification.status in FINISHED_STATUSES and notification.status != Status.CANCELLED:
            return Cancellation(key, False, False, notification.status)
        claims: SentEmailManager = SentEmail.objects
        stopped, in_time, state = claims.cancel(key, notification.pk, why, db)
        if not stopped or notification.status == Status.CANCELLED:  # (a repeat: its first answer)
            return Cancellation(key, stopped, in_time, state)
        Notification.objects.using(db).filter(pk=notification.pk).update(
            status=Status.CANCELLED, last_error=why, updated_at=timezone.now()
        )
        # Its unpublished rows would only carry a message that finds the claim cancelled.
        OutboxMessage.objects.using(db).filter(notification_id=notification.pk, published_at__isnull=True).delete()
        pk = notification.pk
        transaction.on_commit(lambda: events.cancelled(key, pk, in_time), using=db, robust=True)
    return Cancellation(key, True, in_time, Status.CANCELLED)
