"""Putting finished notifications back through the outbox: the admin's retry and resend
actions and ``manage.py notifications retry`` share this one function, so neither can
reopen a key that was sent, nor one that expired or was cancelled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from .conf import settings
from .models import ClaimState, Notification, OutboxMessage, SentEmail, Status

# Claim states a requeue never reopens: a sent key would be sent twice; an expired one
# would be sent after its expires_at; a cancelled one against a person's decision.
NEVER_REOPENED = frozenset({ClaimState.SENT, ClaimState.EXPIRED, ClaimState.CANCELLED})


def requeue(
    queryset: QuerySet[Notification], from_states: Sequence[str], new_status: str, using: str | None = None
) -> int:
    """Reopen the claims in ``from_states`` and queue a new outbox row for each of the
    notifications in ``queryset``; return how many were queued.

    A key whose claim is ``sent`` (or in any state outside ``from_states``, such as one a
    worker holds now) is never reopened, so this cannot cause a second email. A key with
    no claim record at all (it failed before any worker claimed it) is queued too. A
    notification whose ``expires_at`` has passed is left alone: its send would come too
    late (``refusals`` says how many a selection holds). The new outbox row keeps the
    notification's priority. One transaction: the notifications and their records are
    locked while it decides. Raises ``ValueError`` for ``from_states`` that name a state
    in ``NEVER_REOPENED``.
    """
    refused = NEVER_REOPENED.intersection(from_states)
    if refused:
        raise ValueError(f"a requeue never reopens a claim that is {', '.join(sorted(refused))}")
    db = using or settings.DATABASE
    now = timezone.now()
    with transaction.atomic(using=db):
        notifications = [
            n
            for n in queryset.using(db).select_for_update()
            if n.expires_at is None or n.expires_at > now  # read under the lock
        ]
        keys = [n.key for n in notifications]
        # Lock the records and decide from their state now: a key that was already
        # released (or claimed) is not ours to requeue.
        records = dict(SentEmail.objects.using(db).select_for_update().filter(key__in=keys).values_list("key", "state"))
        reopened = {key for key in keys if records.get(key) in from_states}
        SentEmail.objects.reopen(sorted(reopened), list(from_states), db)
        chosen = [n for n in notifications if n.key in reopened or n.key not in records]
        OutboxMessage.objects.using(db).bulk_create(
            [OutboxMessage(notification=n, priority=n.priority) for n in chosen]
        )
        Notification.objects.using(db).filter(pk__in=[n.pk for n in chosen]).update(
            status=new_status, attempts=0, last_error=""
        )
    if chosen:
        from .relay import wake_relay

        transaction.on_commit(wake_relay, using=db)
    return len(chosen)


@dataclass(frozen=True)
class Refusal:
    """What a retry (or resend) of a selection leaves alone by decision rather than by
    the state of its claim, and why: each count is of notifications in the selection."""

    expired: int  # ended expired: a send now would come after their expires_at
    cancelled: int  # cancelled: a person or a service decided they are not sent
    past_expiry: int  # failed (or held) but their expires_at has passed meanwhile

    def messages(self, verb: str = "retried") -> list[str]:
        """One sentence per reason that applies, for the admin's messages and the command
        line."""
        found = []
        if self.expired:
            found.append(
                f"{self.expired} expired notification(s) not {verb}: a send now would come after their expires_at "
                "(send a new notification if it is still wanted)."
            )
        if self.cancelled:
            found.append(
                f"{self.cancelled} cancelled notification(s) not {verb}: a cancel is a decision, not a failure "
                "(send a new notification if it was wrong)."
            )
        if self.past_expiry:
            found.append(
                f"{self.past_expiry} notification(s) not {verb}: their expires_at has passed, so a send now "
                "would come too late."
            )
        return found


def refusals(queryset: QuerySet[Notification], status: str, using: str | None = None) -> Refusal:
    """Count the notifications in ``queryset`` that a requeue of ``status`` ones refuses:
    the expired, the cancelled, and those of ``status`` whose ``expires_at`` has passed
    (``requeue`` leaves these alone itself, under its locks; this only says so)."""
    found = queryset.using(using or settings.DATABASE).aggregate(
        expired=Count("pk", filter=Q(status=Status.EXPIRED)),
        cancelled=Count("pk", filter=Q(status=Status.CANCELLED)),
        past_expiry=Count("pk", filter=Q(status=status, expires_at__lte=timezone.now())),
    )
    return Refusal(**found)


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
