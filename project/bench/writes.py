"""What the delivery path's writes cost PostgreSQL per email: ``make bench-writes``.

The relay's and the worker's statements are run for N notifications in one process, in
the order and the groups a worker makes them (the relay marks 200 rows published at a
time; a batch of 50 is claimed and marked sending in one transaction; its sends are
stamped and recorded 10 at a time, each group's outcomes written with the next group's
starts), with no broker and no mail server, so what is measured is the database's side
alone:

- the CPU of the PostgreSQL backend that ran them, per email (its ``/proc`` ticks);
- the WAL written per email;
- per table, the updates and how many of them were HOT (no index touched), and the size of
  its indexes at the end.

Each run starts from a table of N fresh notifications, vacuumed. Run it at two commits to
compare a change of the write path, alternating: the WAL, the update counts and the index
sizes are the same from run to run, but the CPU drifts with the machine (here by a third
within ten minutes), so only CPU figures from runs side by side compare.

    python -m project.bench.writes --n 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from notifications.chaos.processes import migrate

ROOT = Path(__file__).resolve().parent.parent.parent
TABLES = ("notifications_notification", "notifications_sentemail", "notifications_outboxmessage")
RELAY_BATCH, DELIVERY_BATCH, GROUP = 200, 50, 10


def _admin(sql: str) -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(sql)


def parent(n: int, runs: int) -> int:
    """Create a private database, migrate it, measure in a child, drop the database."""
    database = f"bench_writes_{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFICATIONS_", "DATABASE"))}
    env.update(
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="project.settings",
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{database}",
        NOTIFICATIONS_LOG_LEVEL="WARNING",
    )
    _admin(f'CREATE DATABASE "{database}"')
    try:
        migrate(ROOT, env)
        cmd = [sys.executable, "-m", "project.bench.writes", "--child", "--n", str(n), "--runs", str(runs)]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _stats(cursor: Any) -> dict[str, tuple[int, int]]:
    cursor.execute(
        "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = ANY(%s)", [list(TABLES)]
    )
    return {name: (upd, hot) for name, upd, hot in cursor.fetchall()}


def _dsn(d: dict[str, Any]) -> str:
    return f"host={d['HOST']} port={d['PORT'] or 5432} user={d['USER']} dbname={d['NAME']}"


def one_run(n: int) -> dict[str, Any]:
    from django.db import connection, transaction

    from notifications import notify_many
    from notifications.managers import Finish, Start
    from notifications.models import Notification, OutboxMessage, SentEmail, message_id_for

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(TABLES) + " RESTART IDENTITY CASCADE")
    tag = uuid.uuid4().hex[:6]
    for first in range(0, n, 1000):
        notify_many(
            {
                "service": "bench",
                "notification_id": f"{tag}-{i}",
                "user_id": str(i % 997),
                "to": f"user{i % 997}@example.com",
                "subject": f"Your receipt {i}",
                "body": "Hello,\n\nThanks for your order.\n",
            }
            for i in range(first, min(n, first + 1000))
        )
    connection.close()  # the vacuum and the measuring run in a fresh backend
    with connection.cursor() as cursor:
        for table in TABLES:
            cursor.execute(f"VACUUM ANALYZE {table}")
        cursor.execute("SELECT pg_backend_pid(), pg_current_wal_lsn()")
        pid, wal_before = cursor.fetchone()
        stats_before = _stats(cursor)
    ticks_before, began = _ticks(pid), time.perf_counter()

    outbox = list(OutboxMessage.objects.order_by("id").values_list("id", flat=True))
    for first in range(0, len(outbox), RELAY_BATCH):
        with transaction.atomic():
            OutboxMessage.objects.mark_published(outbox[first : first + RELAY_BATCH], "default")
    rows = list(Notification.objects.order_by("id").values_list("key", "id"))
    lease = 30.0
    for first in range(0, len(rows), DELIVERY_BATCH):
        batch = rows[first : first + DELIVERY_BATCH]
        with transaction.atomic():
            claims = SentEmail.objects.claim_many(batch, "bench@writes", lease, "default")
            SentEmail.objects.mark_sending([(pk, False) for key, pk in batch], "default")
        groups = [batch[i : i + GROUP] for i in range(0, len(batch), GROUP)]
        done: list[Finish] = []
        for group in [*groups, []]:
            starts = [Start(key, claims[key].token, lease, message_id_for(key)) for key, _ in group]
            SentEmail.objects.settle_group(done, starts, "default")
            done = [Finish(s.key, s.token, "sent", "250 2.0.0 Ok: queued", 1) for s in starts]

    seconds = time.perf_counter() - began
    ticks = _ticks(pid) - ticks_before
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s), pg_stat_force_next_flush()", [wal_before])
        wal = int(cursor.fetchone()[0])
        cursor.execute("SELECT relname, pg_indexes_size(oid) FROM pg_class WHERE relname = ANY(%s)", [list(TABLES)])
        index_bytes = dict(cursor.fetchall())
    sent = SentEmail.objects.filter(state="sent").count()
    if sent != n:
        raise SystemExit(f"only {sent} of {n} claims ended sent")
    # The backend flushes its counters when it goes idle after the forced flush; read them
    # from another connection until this run's updates are all counted.
    expected = {TABLES[0]: 3 * n, TABLES[1]: 2 * n, TABLES[2]: n}
    with psycopg.connect(_dsn(connection.settings_dict), autocommit=True) as other:
        deadline = time.monotonic() + 30
        while True:
            with other.cursor() as cursor:
                after = _stats(cursor)
            delta = {t: (after[t][0] - stats_before[t][0], after[t][1] - stats_before[t][1]) for t in TABLES}
            if all(delta[t][0] >= expected[t] for t in TABLES) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "emails": n,
        "seconds": round(seconds, 2),
        "pg_cpu_us_per_email": round(ticks / hz / n * 1e6, 1),
        "wal_bytes_per_email": round(wal / n),
        "index_bytes_per_email": {t.removeprefix("notifications_"): round(index_bytes[t] / n) for t in TABLES},
        "updates_per_email": {t.removeprefix("notifications_"): round(delta[t][0] / n, 2) for t in TABLES},
        "hot_share": {t.removeprefix("notifications_"): round(delta[t][1] / max(1, delta[t][0]), 3) for t in TABLES},
    }


def child(n: int, runs: int) -> None:
    import django

    django.setup()
    results = []
    for run in range(1, runs + 1):
        result = one_run(n)
        results.append(result)
        print(f"run {run}: " + json.dumps(result), flush=True)
    cpu = [r["pg_cpu_us_per_email"] for r in results]
    wal = [r["wal_bytes_per_email"] for r in results]
    print(
        f"median of {runs}: PostgreSQL CPU {statistics.median(cpu):.1f} us per email "
        f"(runs {', '.join(f'{c:.1f}' for c in cpu)}), WAL {statistics.median(wal):.0f} bytes per email",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="emails per run (default 20000)")
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3); the last line gives medians")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.n, args.runs)
        return 0
    return parent(args.n, args.runs)


if __name__ == "__main__":
    sys.exit(main())
