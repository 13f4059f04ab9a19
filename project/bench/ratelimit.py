"""A backend's rate limit as the mail server sees it: ``python -m project.bench.ratelimit``
(``make bench-ratelimit``).

A private database, RabbitMQ vhost and Redis db (created here, dropped at the end), a
recording SMTP server, then the shipped processes: ``--workers`` Celery workers
(``--concurrency`` each) and beat (whose relay loop publishes), every one configured
through the environment with one backend, ``bulk``, limited to ``--rate`` emails per
second. ``--n`` notifications are queued with one ``notify_many()``, and the arrival
time of each at the SMTP server is recorded. It prints the most emails in any one-second
window, the average rate from the first arrival to the last, and the gaps between
arrivals (p50, p99, max); ``--report`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def max_in_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most of ``times`` (seconds) in any window ``width`` long, [t, t + width)."""
    ordered = sorted(times)
    best, first = 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= width:
            first += 1
        best = max(best, last - first + 1)
    return best


def figures(times: Sequence[float], width: float = 1.0) -> dict[str, Any]:
    """What a run's arrival times say about its rate: the fullest window, the average
    from the first arrival to the last, and the gaps between arrivals."""
    ordered = sorted(times)
    gaps = sorted(b - a for a, b in zip(ordered, ordered[1:], strict=False))
    span = ordered[-1] - ordered[0] if len(ordered) > 1 else 0.0

    def gap(q: float) -> float | None:
        return round(gaps[min(len(gaps) - 1, int(len(gaps) * q))] * 1000, 1) if gaps else None

    return {
        "emails": len(ordered),
        "seconds": round(span, 3),
        "max_in_window": max_in_window(ordered, width),
        "average_per_second": round((len(ordered) - 1) / span, 2) if span else None,
        "gap_p50_ms": gap(0.5),
        "gap_p99_ms": gap(0.99),
        "gap_max_ms": round(gaps[-1] * 1000, 1) if gaps else None,
    }


def _pick_redis_db() -> int:
    import redis

    for db in range(14, 0, -1):  # 15 is the chaos run's; tests pick at random among 1-15
        if redis.Redis(host="127.0.0.1", port=6379, db=db).dbsize() == 0:
            return db
    raise RuntimeError("no empty Redis database among 1-14")


def run(n: int, rate: float, workers: int, concurrency: int, timeout: float) -> dict[str, Any]:
    import psycopg

    from notifications.chaos import mailserver
    from notifications.chaos.injectors import add_vhost, sh
    from notifications.chaos.processes import Fleet, migrate
    from notifications.chaos.run import free_port

    run_id = uuid.uuid4().hex[:8]
    database, vhost, redis_db = f"bench_rate_{run_id}", f"notifications-bench-rate-{run_id}", _pick_redis_db()
    logs = Path(f"/tmp/notifications-bench-rate-{run_id}")
    logs.mkdir(parents=True, exist_ok=True)
    server = mailserver.start(free_port())
    backends = {
        "bulk": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": server.port, "timeout": 10},
            "RATE_LIMIT": rate,
        }
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFICATIONS_", "CELERY_BROKER", "EMAIL_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{database}",
        CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        REDIS_URL=f"redis://127.0.0.1:6379/{redis_db}",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(server.port),
        NOTIFICATIONS_BACKENDS=json.dumps(backends),
        NOTIFICATIONS_LOG_LEVEL="WARNING",
    )
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    add_vhost(vhost)
    fleet = Fleet(root=ROOT, env=env, logs=logs)
    try:
        migrate(ROOT, env)
        for i in range(workers):
            fleet.wait_ready(fleet.worker(f"worker{i}", concurrency))
        fleet.beat()
        os.environ.update(env)
        import django

        django.setup()
        from notifications import notify_many

        items = [
            {
                "service": "bench-rate",
                "notification_id": f"{run_id}-{i}",
                "user_id": str(i),
                "to": f"user{i}@example.com",
                "subject": "Your weekly digest",
                "body": "Hello,\n\nthis is the weekly digest.\n",
                "backend": "bulk",
            }
            for i in range(n)
        ]
        keys = {x.key for x in notify_many(items)}
        deadline = time.monotonic() + timeout
        while len({r.key for r in server.all_messages()} & keys) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every email arrived within {timeout}s (logs in {logs})")
            time.sleep(0.2)
        arrived = [r for r in server.all_messages() if r.key in keys]
        result = {
            "rate_limit": rate,
            "workers": workers,
            "concurrency": concurrency,
            "duplicates": len(arrived) - len({r.key for r in arrived}),
            **figures([r.at for r in arrived]),
        }
        from django.db import connections

        connections.close_all()
        return result
    finally:
        fleet.stop_all()
        server.stop()
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        sh("rabbitmqctl", "-q", "delete_vhost", vhost)
        sh("redis-cli", "-n", str(redis_db), "flushdb")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], prog="python -m project.bench.ratelimit"
    )
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--rate", type=float, default=50.0, help="The backend's RATE_LIMIT, emails per second.")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="Pool processes per worker.")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--report", help="Write the figures as JSON to this file.")
    args = parser.parse_args(argv)
    result = run(args.n, args.rate, args.workers, args.concurrency, args.timeout)
    print(json.dumps(result, indent=2))
    print(
        f"{result['emails']} emails at RATE_LIMIT={args.rate:g}/s over {args.workers} workers: "
        f"at most {result['max_in_window']} in any second (limit x 1.1 = {args.rate * 1.1:g}), "
        f"{result['average_per_second']}/s on average, gaps p50 {result['gap_p50_ms']} ms, "
        f"p99 {result['gap_p99_ms']} ms, max {result['gap_max_ms']} ms",
        file=sys.stderr,
    )
    if args.report:
        with open(args.report, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
