"""How fast the on-call dashboard and the admin lists answer on a table of 1,000,000
notifications: ``python -m project.bench.dashboard``.

A private database (``bench_dashboard_<random>``, dropped at the end unless ``--keep``) is
migrated and filled with ``generate_series`` SQL, in the proportions of a service that has
run for a month: mostly sent, spread over 30 days (so about 1,400 in the last hour), 1%
failed with one of four reasons, a hundred held ambiguous, a few hundred retrying with a
retry due later, a few dozen claims whose lease ran out, and a backlog of 20,000 written
in the last ten minutes and not yet published. Every notification has its outbox row and
every claimed one its sent-email record, as the pipeline leaves them.

After ``VACUUM ANALYZE``, each figure of ``notifications.status`` that the dashboard shows,
the dashboard page itself and the admin pages an operator opens (lists, filters, searches)
are timed: the median of ``--runs`` runs after one warm-up, in milliseconds. Pages go
through Django's test client as a superuser, so the time includes every query the admin
makes and the template, and no web server.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

REASONS = (
    "550 5.1.1 No such user",
    "gave up after 8 attempts: 421 4.7.0 Try again later",
    "554 5.7.1 Message rejected as spam",
    "552 5.2.2 Mailbox full",
)
SERVICES = ("billing", "shipping", "accounts", "marketing", "support")
BACKLOG = 20_000


def fill_sql(rows: int) -> list[str]:
    """The statements that fill the three tables with ``rows`` notifications."""
    n, backlog = rows, min(BACKLOG, rows // 10)
    reasons = ", ".join(f"'{r}'" for r in REASONS)
    services = ", ".join(f"'{s}'" for s in SERVICES)
    # r spreads the statuses over the ids without a pattern a planner could exploit.
    status = (
        f"CASE WHEN g > {n - backlog} THEN 'created' "
        "WHEN r < 100 THEN 'failed' "
        "WHEN r = 100 AND g % 10 = 0 THEN 'ambiguous' "
        f"WHEN r BETWEEN 101 AND 110 AND g > {n - 200_000} THEN 'retrying' "
        f"WHEN r BETWEEN 111 AND 112 AND g > {n - 200_000} THEN 'sending' "
        "ELSE 'sent' END"
    )
    # Created over 30 days, the newest the most recent; the backlog in the last ten minutes.
    created = (
        f"CASE WHEN g > {n - backlog} THEN now() - make_interval(secs => ({n} - g) * 600.0 / {backlog}) "
        f"ELSE now() - interval '10 minutes' - make_interval(secs => ({n} - {backlog} - g) * 2592000.0 / {n}) END"
    )
    return [
        f"""
        INSERT INTO notifications_notification
            (id, key, service, notification_id, user_id, "to", from_email, subject, body, html_body, metadata,
             status, attempts, ambiguous_count, last_error, recoveries, created_at, published_at, sent_at, updated_at)
        SELECT g, s || ':n' || g || ':' || u, s, 'n' || g, u,
               CASE WHEN g % 4 = 0 THEN 'User ' || u || ' <user' || u || '@example' || (g % 7) || '.com>'
                    ELSE 'user' || u || '@example' || (g % 7) || '.com' END,
               '', 'Your invoice #' || g || ' is ready to download from your account page', 'Hello, ...', '',
               '{{}}'::jsonb, st,
               CASE WHEN st = 'created' THEN 0 WHEN st = 'failed' THEN 8 ELSE 1 END,
               CASE WHEN st = 'ambiguous' THEN 1 ELSE 0 END,
               CASE WHEN st = 'failed' THEN (ARRAY[{reasons}])[1 + g % 4]
                    WHEN st = 'ambiguous' THEN 'held: the previous send''s outcome is unknown; decide in the admin'
                    WHEN st = 'retrying' THEN '421 4.7.0 Try again later' ELSE '' END,
               0, c, CASE WHEN st <> 'created' THEN c + interval '50 milliseconds' END,
               CASE WHEN st = 'sent' THEN c + make_interval(secs => 0.2 + (g % 29) / 10.0) END,
               c + interval '1 second'
        FROM (
            SELECT g, r, (ARRAY[{services}])[1 + g % 5] AS s, (g % 50000)::text AS u, {status} AS st, {created} AS c
            FROM (SELECT g, (g::bigint * 7919) % 10000 AS r FROM generate_series(1, {n}) AS g) AS ids
        ) AS rows_
        """,
        f"SELECT setval(pg_get_serial_sequence('notifications_notification', 'id'), {n})",
        """
        INSERT INTO notifications_outboxmessage (notification_id, created_at, due_at, published_at)
        SELECT id, created_at, NULL, published_at FROM notifications_notification ORDER BY id
        """,
        """
        INSERT INTO notifications_outboxmessage (notification_id, created_at, due_at, published_at)
        SELECT id, now(), now() + make_interval(secs => 60 + id % 600), NULL
        FROM notifications_notification WHERE status = 'retrying'
        """,
        """
        INSERT INTO notifications_sentemail
            (key, notification_id, state, token, owner, lease_expires_at, send_started_at, attempts,
             ambiguous_count, message_id, response, created_at, updated_at, sent_at)
        SELECT key, id,
               CASE status WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed' WHEN 'ambiguous' THEN 'held'
                           WHEN 'retrying' THEN 'released' ELSE 'claimed' END,
               1, CASE WHEN status = 'sending' THEN 'celery@worker-' || (id % 3) ELSE '' END,
               CASE WHEN status = 'sending' THEN now() - make_interval(secs => 5 + id % 300) END, NULL,
               attempts, ambiguous_count,
               '<' || encode(sha256(convert_to(key, 'UTF8')), 'hex') || '@notifications.local>',
               CASE WHEN status = 'sent' THEN '250 2.0.0 Ok: queued' ELSE last_error END,
               published_at, coalesce(sent_at, published_at), sent_at
        FROM notifications_notification WHERE status IN ('sent', 'failed', 'ambiguous', 'retrying', 'sending')
        ORDER BY id
        """,
    ]


class SQLTimer:
    """Adds up the time spent in the database (Django's execute wrapper)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds += time.perf_counter() - started


def median_ms(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median wall time and median time in SQL, in ms, after one warm-up run (which
    reads the pages from disk; later runs find them in the cache)."""
    from django.db import connection

    fn()
    times, sql = [], []
    for _ in range(runs):
        timer = SQLTimer()
        with connection.execute_wrapper(timer):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        sql.append(timer.seconds * 1000)
    return statistics.median(times), statistics.median(sql)


def measurements(runs: int) -> list[tuple[str, float, float]]:
    """(what, median ms, of which SQL) for each dashboard figure and admin page."""
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from notifications import status
    from notifications.models import Notification

    user, _ = get_user_model()._default_manager.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)

    def page(url: str, **query: str) -> Callable[[], None]:
        def get() -> None:
            response = client.get(url, query)
            assert response.status_code == 200, (url, query, response.status_code)

        return get

    sample = Notification.objects.filter(status="sent").order_by("id")[500_000 // 2 : 500_000 // 2 + 1].get()
    notifications = reverse("admin:notifications_notification_changelist")
    timed: list[tuple[str, Callable[[], Any]]] = [
        ("status.counts_by_status() (exact)", status.counts_by_status),
        ("status.counts_by_status_bounded() (the dashboard's)", status.counts_by_status_bounded),
        ("status.backlog()", status.backlog),
        ("status.lag() (last hour)", status.lag),
        ("status.sent_per_minute() (last hour)", status.sent_per_minute),
        ("status.failures_by_reason()", status.failures_by_reason),
        ("status.held_count()", status.held_count),
        ("status.stuck_claims()", status.stuck_claims),
    ]
    timed += [
        ("status.held() (the 50 oldest)", status.held),
        ("status.stuck_claim_list() (the 50 oldest)", status.stuck_claim_list),
        ("status.services() (the service filter)", status.services),
        ("dashboard page", page(reverse("admin:notifications_notification_dashboard"))),
        ("notification list", page(notifications)),
        ("  filtered: status failed", page(notifications, status__exact="failed")),
        ("  filtered: status ambiguous", page(notifications, status__exact="ambiguous")),
        ("  filtered: service billing", page(notifications, service__exact="billing")),
        ("  filtered: failed, one reason", page(notifications, status__exact="failed", last_error=REASONS[0])),
        ("  search: exact key", page(notifications, q=sample.key)),
        ("  search: key prefix (service:notification_id)", page(notifications, q=sample.key.rsplit(":", 1)[0])),
        ("  search: notification_id", page(notifications, q=sample.notification_id)),
        ("  search: user_id", page(notifications, q=sample.user_id)),
        ("  search: recipient address", page(notifications, q=f"user{sample.user_id}@example{sample.pk % 7}.com")),
        ("outbox list", page(reverse("admin:notifications_outboxmessage_changelist"))),
        (
            "  filtered: unpublished",
            page(reverse("admin:notifications_outboxmessage_changelist"), published_at__isnull="True"),
        ),
        ("  search: exact key", page(reverse("admin:notifications_outboxmessage_changelist"), q=sample.key)),
        ("sent-email list", page(reverse("admin:notifications_sentemail_changelist"))),
        (
            "  filtered: state claimed",
            page(reverse("admin:notifications_sentemail_changelist"), state__exact="claimed"),
        ),
        ("  search: exact key", page(reverse("admin:notifications_sentemail_changelist"), q=sample.key)),
        (
            "  search: Message-ID",
            page(reverse("admin:notifications_sentemail_changelist"), q=sample.message_id),
        ),
    ]
    return [(what, *median_ms(fn, runs)) for what, fn in timed]


def fill(rows: int) -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        for sql in fill_sql(rows):
            cursor.execute(sql)
        for table in ("notifications_notification", "notifications_outboxmessage", "notifications_sentemail"):
            cursor.execute(f"VACUUM (ANALYZE) {table}")
        cursor.execute("SELECT status, count(*) FROM notifications_notification GROUP BY 1 ORDER BY 2 DESC")
        return dict(cursor.fetchall())


def run(rows: int, runs: int, keep: bool, server: str, reuse: str = "") -> int:
    database = reuse or f"bench_dashboard_{uuid.uuid4().hex[:8]}"
    if not reuse:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
    print(f"database {database}", flush=True)
    try:
        os.environ["DATABASE_URL"] = f"{server}/{database}"
        os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
        os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
        os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"  # the test client's host
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connections

        call_command("migrate", verbosity=0)
        if not reuse:
            started = time.monotonic()
            counts = fill(rows)
            print(f"filled {rows:,} notifications in {time.monotonic() - started:.0f} s: {counts}", flush=True)
        results = measurements(runs)
        width = max(len(what) for what, _, _ in results)
        print(f"\nmedian of {runs} runs, ms")
        print(f"{'query or page':<{width}}  {'total':>8}  {'in SQL':>8}")
        for what, ms, sql in results:
            print(f"{what:<{width}}  {ms:8.1f}  {sql:8.1f}")
        connections.close_all()
        return 0
    finally:
        if keep or reuse:
            print(f"kept {database}")
        else:
            with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="Notifications to fill (default 1,000,000).")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per query or page (default 5).")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards (it is printed).")
    parser.add_argument(
        "--server",
        default=os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432"),
        help="PostgreSQL server URL without a database name (default $BENCH_POSTGRES or the local server).",
    )
    parser.add_argument("--reuse", default="", help="Measure a database a --keep run left (no fill, not dropped).")
    args = parser.parse_args(argv)
    return run(args.rows, args.runs, args.keep, args.server.rstrip("/"), args.reuse)


if __name__ == "__main__":
    sys.exit(main())
