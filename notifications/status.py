"""What an operator asks of the pipeline, answered from the database: are emails going
out, how late, and what is stuck.

The admin dashboard, ``manage.py notifications status`` and the metrics gauges all read
these figures here, so they can never disagree. Every query is bounded by an index (the
status index, the pending-outbox index, the ``sent_at`` index, the claim-state index),
so they stay quick on a table of millions of notifications.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta
from typing import Any

from django.db import connections
from django.utils import timezone

from .conf import settings

LAG_WINDOW = timedelta(hours=1)


@dataclass
class Backlog:
    """Unpublished outbox rows: due now (waiting for the relay) and due later (retries)."""

    due: int
    scheduled: int
    oldest_due_age: float | None  # seconds since the oldest due row was written


@dataclass
class Scheduled:
    """Unpublished outbox rows due later (sends scheduled with ``send_at`` and retries
    waiting out their backoff), per priority, and when the first of them falls due."""

    waiting: int
    by_priority: dict[str, int]
    next_due_at: datetime | None
    next_due_in: float | None  # seconds from now until next_due_at


@dataclass
class Lag:
    """Commit → SMTP acceptance, over the notifications sent in the window."""

    count: int
    p50: float | None
    p99: float | None
    max: float | None


@dataclass
class Snapshot:
    counts: dict[str, int]
    backlog: Backlog
    lag: Lag
    held: int
    stuck_claims: int
    scheduled: Scheduled
    taken_at: datetime = field(default_factory=timezone.now)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["taken_at"] = self.taken_at.isoformat()
        due = self.scheduled.next_due_at
        data["scheduled"]["next_due_at"] = due.isoformat() if due else None
        return data


def _table(model_name: str) -> str:
    from django.apps import apps

    return connections[settings.DATABASE].ops.quote_name(apps.get_model("notifications", model_name)._meta.db_table)


def _rows(sql: str, params: list[Any] | tuple[Any, ...] = (), using: str | None = None) -> list[tuple[Any, ...]]:
    with connections[using or settings.DATABASE].cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def counts_by_status(using: str | None = None) -> dict[str, int]:
    """Notifications per status (every status present, zero when none)."""
    from .models import Status

    counts = {status.value: 0 for status in Status}
    for status, count in _rows(f'SELECT "status", count(*) FROM {_table("Notification")} GROUP BY 1', using=using):
        counts[status] = count
    return counts


EXACT_UP_TO = 100_000


@dataclass
class Counts:
    """Notifications per status; those in ``estimated`` passed the exact-count limit and
    hold PostgreSQL's estimate instead."""

    counts: dict[str, int]
    estimated: list[str]
    exact_up_to: int


def counts_by_status_bounded(exact_up_to: int = EXACT_UP_TO, using: str | None = None) -> Counts:
    """Notifications per status at a bounded cost, for pages that reload every few
    seconds: each status is counted through the status index up to ``exact_up_to`` rows
    (one statement), and a status with more (``sent``, on a busy table) gets the
    planner's estimate from the table's statistics (within a percent or so after
    ANALYZE) rather than a count that reads a million index entries."""
    from .models import Status

    table = _table("Notification")
    # One statement; each status a literal, so each is planned with its own statistics
    # (the index for a rare status, a scan stopped by the LIMIT for a common one).
    found = _rows(
        " UNION ALL ".join(
            f'SELECT %s, (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE "status" = %s LIMIT %s) AS x)'
            for _ in Status
        ),
        [value for status in Status for value in (status.value, status.value, exact_up_to + 1)],
        using=using,
    )
    counts, estimated = {}, []
    for status, count in found:
        if count > exact_up_to:
            (plan,) = _rows(f'EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} WHERE "status" = %s', [status], using)[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            count = max(int(plan[0]["Plan"]["Plan Rows"]), exact_up_to + 1)
            estimated.append(status)
        counts[status] = count
    return Counts(counts=counts, estimated=estimated, exact_up_to=exact_up_to)


def backlog(using: str | None = None) -> Backlog:
    """The outbox rows not yet published, read through the pending-rows index."""
    outbox = _table("OutboxMessage")
    (due, scheduled, oldest) = _rows(
        f'SELECT count(*) FILTER (WHERE "due_at" IS NULL OR "due_at" <= now()), '
        f'count(*) FILTER (WHERE "due_at" > now()), '
        f'extract(epoch FROM now() - min("created_at") FILTER (WHERE "due_at" IS NULL OR "due_at" <= now())) '
        f'FROM {outbox} WHERE "published_at" IS NULL',
        using=using,
    )[0]
    return Backlog(due=due, scheduled=scheduled, oldest_due_age=float(oldest) if oldest is not None else None)


def scheduled(using: str | None = None) -> Scheduled:
    """The outbox rows due later, read as one range of the pending-rows index
    (``notifications_outbox_due``: priority, due_at) per priority: the count and the
    first due time of each, in one statement."""
    from .models import Priority

    outbox = _table("OutboxMessage")
    found = _rows(
        " UNION ALL ".join(
            f'SELECT %s, count(*), min("due_at"), extract(epoch FROM min("due_at") - now()) FROM {outbox} '
            f'WHERE "published_at" IS NULL AND "priority" = %s AND "due_at" > now()'
            for _ in Priority
        ),
        [value for priority in Priority for value in (priority.value, priority.value)],
        using=using,
    )
    by_priority = {priority: count for priority, count, _, _ in found}
    firsts = [(due, float(seconds)) for _, _, due, seconds in found if due is not None]
    first = min(firsts, default=(None, None))
    return Scheduled(
        waiting=sum(by_priority.values()), by_priority=by_priority, next_due_at=first[0], next_due_in=first[1]
    )


def lag(window: timedelta = LAG_WINDOW, using: str | None = None) -> Lag:
    """Percentiles of commit → SMTP acceptance for notifications sent within ``window``."""
    count, p50, p99, top = _rows(
        "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY d), "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d) FROM ("
        f'SELECT extract(epoch FROM "sent_at" - "created_at") AS d FROM {_table("Notification")} '
        '"n" WHERE "sent_at" >= now() - %s) AS s',
        [window],
        using=using,
    )[0]
    as_float = lambda v: float(v) if v is not None else None  # noqa: E731
    return Lag(count=count, p50=as_float(p50), p99=as_float(p99), max=as_float(top))


def sent_per_minute(minutes: int = 60, using: str | None = None) -> list[tuple[datetime, int]]:
    """Emails sent in each of the last ``minutes`` minutes, oldest first, zeros included."""
    now = timezone.now().replace(second=0, microsecond=0)
    start = now - timedelta(minutes=minutes - 1)
    found = dict(
        _rows(
            f"SELECT date_trunc('minute', \"sent_at\"), count(*) FROM {_table('Notification')} "
            '"n" WHERE "sent_at" >= %s GROUP BY 1',
            [start],
            using=using,
        )
    )
    return [(start + timedelta(minutes=i), found.get(start + timedelta(minutes=i), 0)) for i in range(minutes)]


def failures_by_reason(limit: int = 20, using: str | None = None) -> list[tuple[str, int]]:
    """Failed notifications grouped by their last error, most frequent first."""
    return [
        (reason, count)
        for reason, count in _rows(
            f'SELECT "last_error", count(*) FROM {_table("Notification")} WHERE "status" = \'failed\' '
            "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s",
            [limit],
            using=using,
        )
    ]


def held_count(using: str | None = None) -> int:
    """Ambiguous notifications held for a person to decide (hold mode)."""
    from .models import Notification, Status

    return Notification.objects.using(using or settings.DATABASE).filter(status=Status.AMBIGUOUS).count()


def stuck_claims(using: str | None = None) -> int:
    """Claims whose lease ran out: their worker died, is paused or cannot reach the database."""
    from .models import SentEmail

    return SentEmail.objects.stuck(using or settings.DATABASE).count()


def services(limit: int = 100, using: str | None = None) -> list[str]:
    """The services that have notifications, in order (at most ``limit``): a skip scan of
    the service index, one index probe per service, where ``SELECT DISTINCT`` would read
    every row."""
    table = _table("Notification")
    return [
        service
        for (service,) in _rows(
            "WITH RECURSIVE s (service, n) AS ("
            f'(SELECT "service", 1 FROM {table} ORDER BY "service" LIMIT 1) '
            f'UNION ALL SELECT (SELECT "service" FROM {table} WHERE "service" > s.service '
            'ORDER BY "service" LIMIT 1), n + 1 FROM s WHERE s.service IS NOT NULL AND n < %s) '
            "SELECT service FROM s WHERE service IS NOT NULL",
            [limit],
            using=using,
        )
    ]


@dataclass
class Held:
    """A held ambiguous notification, as the dashboard lists it for a decision."""

    id: int
    key: str
    to: str
    subject: str
    last_error: str
    ambiguous_count: int
    created_at: datetime
    updated_at: datetime


def held(limit: int = 50, using: str | None = None) -> list[Held]:
    """The oldest ``limit`` held ambiguous notifications, read through the status index."""
    from .models import Notification, Status

    fields = [f.name for f in dataclass_fields(Held)]
    rows = (
        Notification.objects.using(using or settings.DATABASE)
        .filter(status=Status.AMBIGUOUS)
        .order_by("created_at", "id")
        .values_list(*fields)[:limit]
    )
    return [Held(*row) for row in rows]


@dataclass
class StuckClaim:
    """A claim whose lease ran out, and since when."""

    key: str
    owner: str
    token: int
    lease_expires_at: datetime
    expired_for: float  # seconds since the lease ran out
    notification_id: int | None


def stuck_claim_list(limit: int = 50, using: str | None = None) -> list[StuckClaim]:
    """The ``limit`` claims whose lease ran out longest ago (the claim-state index)."""
    from .models import SentEmail

    now = timezone.now()
    rows = (
        SentEmail.objects.stuck(using or settings.DATABASE)
        .order_by("lease_expires_at", "id")
        .values_list("key", "owner", "token", "lease_expires_at", "notification_id")[:limit]
    )
    return [
        StuckClaim(key, owner, token, expires, (now - expires).total_seconds(), notification)
        for key, owner, token, expires, notification in rows
    ]


def snapshot(using: str | None = None, window: timedelta = LAG_WINDOW) -> Snapshot:
    return Snapshot(
        counts=counts_by_status(using),
        backlog=backlog(using),
        lag=lag(window, using),
        held=held_count(using),
        stuck_claims=stuck_claims(using),
        scheduled=scheduled(using),
    )
