"""Putting finished notifications back through the outbox: the admin's retry and resend
actions and ``manage.py notifications retry`` share this one function, so neither can
reopen a key that was sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import QuerySet

from .conf import settings
from .models import ClaimState, Notification, OutboxMessage, SentEmail, Status


def requeue(
    queryset: QuerySet[Notification], from_states: Sequence[str], new_status: str, using: str | None = None
) -> int:
    """Reopen the claims in ``from_states`` and queue a new outbox row for each of the
    notifications in ``queryset``; return how many were queued.

    A key whose claim is ``sent`` (or in any state outside ``from_states``, such as one a
    worker holds now) is never reopened, so this cannot cause a second email. A key with
    no claim record at all (it failed before any worker claimed it) is queued too. One
    transaction: the notifications and their records are locked while it decides.
    """
    db = using or settings.DATABASE
    with transaction.atomic(using=db):
        notifications = list(queryset.using(db).select_for_update())
        keys = [n.key for n in notifications]
        # Lock the records and decide from their state now: a key that was already
        # released (or claimed) is not ours to requeue.
        records = dict(SentEmail.objects.using(db).select_for_update().filter(key__in=keys).values_list("key", "state"))
        reopened = {key for key in keys if records.get(key) in from_states}
        SentEmail.objects.reopen(sorted(reopened), list(from_states), db)
        chosen = [n for n in notifications if n.key in reopened or n.key not in records]
        OutboxMessage.objects.using(db).bulk_create([OutboxMessage(notification=n) for n in chosen])
        Notification.objects.using(db).filter(pk__in=[n.pk for n in chosen]).update(
            status=new_status, attempts=0, last_error=""
        )
    if chosen:
        from .relay import wake_relay

        transaction.on_commit(wake_relay, using=db)
    return len(chosen)


@dataclass(frozen=True)
class Kind:
    """What a requeue of one kind selects, which claims it reopens, and what it is called."""

    status: str
    from_states: tuple[str, ...]
    verb: str


# Failed ones retry (their claim says no email went out); held ambiguous ones resend,
# which may give the recipient a second copy: the admin asks for a permission of its
# own, the command line for an explicit flag.
RETRY = Kind(Status.FAILED, (ClaimState.FAILED,), "retry")
RESEND = Kind(Status.AMBIGUOUS, (ClaimState.HELD,), "resend")


def matching(
    kind: Kind,
    *,
    service: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    keys: Sequence[str] = (),
    using: str | None = None,
) -> QuerySet[Notification]:
    """The notifications of ``kind``'s status that match every filter given: ``service``
    exactly, ``reason`` as a case-insensitive part of the last error, created in
    ``[since, until)``, one of ``keys``. Ordered by id."""
    queryset = Notification.objects.using(using or settings.DATABASE).filter(status=kind.status)
    if service:
        queryset = queryset.filter(service=service)
    if reason:
        queryset = queryset.filter(last_error__icontains=reason)
    if since:
        queryset = queryset.filter(created_at__gte=since)
    if until:
        queryset = queryset.filter(created_at__lt=until)
    if keys:
        queryset = queryset.filter(key__in=list(keys))
    return queryset.order_by("id")
