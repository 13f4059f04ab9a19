"""The retention purge on a million notifications: ``python -m project.bench.retention``
(``make bench-retention``).

A private database (a unique name on the server of ``DATABASE_URL``, dropped at the end)
is migrated and filled with ``--rows`` sent and failed notifications, each with a
published outbox row and a sent-email record, ``--old`` of them past the retention
settings and the rest within them (one ``INSERT ... SELECT FROM generate_series`` per
table). Then, while one thread calls ``notify()`` in a loop and another runs the relay's
claim of pending outbox rows (in a transaction that rolls back), it measures:

1. a baseline of ``--baseline`` seconds without a purge;
2. ``notifications.retention.purge()`` with the shipped batch size.

It prints what was deleted, how long it took, rows per second, the batches and the
longest one (the longest any row stayed locked), and the latency of ``notify()`` and of
the relay's claim, p50/p99/max, before and during the purge. ``--report`` writes the
figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

BODY = (
    "Hello,\n\nThis is a benchmark notification about as long as a short transactional email: "
    "a greeting, two sentences and a link.\n\nhttps://example.com/notifications/settings\n\n"
    "-- \nThe notification service, #"
)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _percentiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


class Loop(threading.Thread):
    """Call ``action`` until stopped, recording how long each call took."""

    def __init__(self, action: Callable[[int], None]) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.samples: list[float] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.window: list[float] | None = None

    def run(self) -> None:
        from django.db import connection

        i = 0
        try:
            while not self.stopping.is_set():
                i += 1
                started = time.perf_counter()
                try:
                    self.action(i)
                except Exception as exc:  # counted, so a failure shows in the report
                    self.errors.append(repr(exc))
                took = time.perf_counter() - started
                if self.window is not None:
                    self.window.append(took)
                time.sleep(0.005)  # a steady caller, not a flood
        finally:
            connection.close()

    def open_window(self) -> None:
        self.window = []

    def close_window(self) -> list[float]:
        window, self.window = self.window or [], None
        return window


def fill(rows: int, old: int) -> float:
    """Notifications, outbox rows and sent-email records: ``old`` of them 31 to 60 days
    old, the rest spread over the last 29 days; one in twenty failed."""
    from django.db import connection

    from notifications.models import Notification, OutboxMessage, SentEmail

    n, o, s = (m._meta.db_table for m in (Notification, OutboxMessage, SentEmail))
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute(
            f'INSERT INTO {n} ("key", "service", "notification_id", "user_id", "to", "from_email", "subject", '
            f'"body", "html_body", "metadata", "status", "attempts", "ambiguous_count", "last_error", "recoveries", '
            f'"created_at", "published_at", "sent_at", "updated_at") '
            f"SELECT 'bench:' || i || ':' || (i %% 1000), 'bench', i::text, (i %% 1000)::text, "
            f"'user' || i || '@example.com', '', 'Your invoice ' || i, %s || i, '', '{{}}'::jsonb, "
            f"CASE WHEN i %% 20 = 0 THEN 'failed' ELSE 'sent' END, 1, 0, "
            f"CASE WHEN i %% 20 = 0 THEN '550 5.1.1 No such user' ELSE '' END, 0, t, t, "
            f"CASE WHEN i %% 20 = 0 THEN NULL ELSE t + interval '1 second' END, t + interval '1 second' "
            f"FROM (SELECT i, CASE WHEN i <= %s THEN now() - interval '31 days' - (i * interval '29 days' / %s) "
            f"ELSE now() - ((i - %s) * interval '29 days' / %s) END AS t FROM generate_series(1, %s) i) g",
            [BODY, old, max(old, 1), old, max(rows - old, 1), rows],
        )
        cursor.execute(
            f'INSERT INTO {o} ("notification_id", "created_at", "published_at") '
            f'SELECT "id", "created_at", "published_at" FROM {n} ORDER BY "id"'
        )
        cursor.execute(
            f'INSERT INTO {s} ("key", "notification_id", "state", "token", "owner", "attempts", "ambiguous_count", '
            f'"message_id", "response", "created_at", "updated_at", "sent_at") '
            f"SELECT \"key\", \"id\", CASE WHEN \"status\" = 'failed' THEN 'failed' ELSE 'sent' END, 1, '', 1, 0, "
            f"'', CASE WHEN \"status\" = 'failed' THEN \"last_error\" ELSE '250 OK' END, \"created_at\", "
            f'"updated_at", "sent_at" FROM {n} ORDER BY "id"'
        )
    with connection.cursor() as cursor:
        for table in (n, o, s):
            cursor.execute(f"VACUUM ANALYZE {table}")
    return time.monotonic() - started


def measure(rows: int, old: int, baseline: float) -> dict[str, Any]:
    from django.db import transaction

    from notifications import notify, retention
    from notifications.conf import settings
    from notifications.models import OutboxMessage

    filled = fill(rows, old)
    print(f"filled {rows} notifications ({old} past retention) with outbox rows and records in {filled:.1f}s")

    def call_notify(i: int) -> None:
        notify(service="live", notification_id=str(i), user_id="1", to="ann@example.com", subject="Hi", body="Hello")

    def claim(i: int) -> None:
        with transaction.atomic():
            OutboxMessage.objects.claim_pending(int(settings.RELAY_BATCH_SIZE), settings.DATABASE)
            transaction.set_rollback(True)  # the rows stay pending: the same claim each time

    loops = notifier, relay = Loop(call_notify), Loop(claim)
    for loop in loops:
        loop.start()
    time.sleep(1.0)  # connections opened, statements planned
    for loop in loops:
        loop.open_window()
    time.sleep(baseline)
    notify_before, claim_before = (loop.close_window() for loop in loops)

    batches: list[float] = []
    passes: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(name: str, count: int, total: int) -> None:
        now = time.perf_counter()
        batches.append(now - last[0])
        passes[name] = passes.get(name, 0.0) + now - last[0]
        last[0] = now
        if len(batches) % 200 == 0:
            print(f"  {name}: {total} deleted, {len(batches)} batches")

    for loop in loops:
        loop.open_window()
    started = last[0] = time.perf_counter()
    result = retention.purge(progress=progress)
    seconds = time.perf_counter() - started
    notify_during, claim_during = (loop.close_window() for loop in loops)
    for loop in loops:
        loop.stopping.set()
        loop.join()
    deleted = result.notifications + result.outbox + result.sent
    return {
        "rows": rows,
        "past_retention": old,
        "batch_size": int(settings.PURGE_BATCH_SIZE),
        "fill_seconds": round(filled, 1),
        "deleted": {"notifications": result.notifications, "outbox": result.outbox, "sent": result.sent},
        "skipped": result.skipped,
        "purge_seconds": round(seconds, 2),
        "rows_per_second": round(deleted / seconds),
        "notifications_per_second": round(result.notifications / seconds),
        "batches": result.batches,
        "pass_seconds": {name: round(spent, 1) for name, spent in passes.items()},
        "longest_batch_ms": round(max(batches) * 1000, 1) if batches else None,
        "notify_before": _percentiles(notify_before),
        "notify_during": _percentiles(notify_during),
        "claim_before": _percentiles(claim_before),
        "claim_during": _percentiles(claim_during),
        "errors": notifier.errors + relay.errors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m project.bench.retention")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--old", type=int, default=None, help="Rows past retention (default: 70%% of --rows).")
    parser.add_argument("--baseline", type=float, default=10.0, help="Seconds measured before the purge.")
    parser.add_argument("--report", help="Write the figures as JSON to this file.")
    args = parser.parse_args(argv)
    old = int(args.rows * 0.7) if args.old is None else args.old

    server = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/notifications")
    name = f"bench_retention_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_with_database(server, "postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        os.environ["DATABASE_URL"] = _with_database(server, name)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
        import django

        django.setup()
        from django.conf import settings
        from django.core.management import call_command
        from django.db import connections

        settings.NOTIFICATIONS_RELAY_ON_COMMIT = False  # notify() and the database only: no Redis wake-ups
        call_command("migrate", verbosity=0)
        figures = {"database": name, **measure(args.rows, old, args.baseline)}
        connections.close_all()
    finally:
        with psycopg.connect(_with_database(server, "postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps(figures, indent=2))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
