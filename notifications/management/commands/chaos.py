"""``manage.py chaos``: prove the contract under faults (see notifications/chaos/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Run the real pipeline (beat, workers, a misbehaving SMTP server) against the local services "
        "while injecting seeded faults; check that nothing is lost and every duplicate is explained."
    )

    def add_arguments(self, parser: Any) -> None:
        from notifications.chaos.injectors import ALL_FAULTS

        parser.add_argument("--n", type=int, default=5000, help="notify() calls (default 5000)")
        parser.add_argument("--duration", type=float, default=60.0, help="seconds the traffic is spread over")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument(
            "--faults",
            default="all",
            help=f"comma-separated kinds, 'all' or 'none' (kinds: {', '.join(ALL_FAULTS)})",
        )
        parser.add_argument("--fault-every", type=float, default=3.0, help="mean seconds between faults")
        parser.add_argument("--workers", type=int, default=3)
        parser.add_argument("--concurrency", type=int, default=2)
        parser.add_argument("--mode", choices=["resend", "hold"], default="resend", help="NOTIFICATIONS_AMBIGUOUS")
        parser.add_argument(
            "--drain-timeout",
            type=float,
            default=60.0,
            help="seconds after the faults stop by which everything must be delivered (default 60)",
        )
        parser.add_argument(
            "--consumer-timeout",
            type=float,
            default=None,
            help="lower RabbitMQ's consumer_timeout to this for the run (default: leave the broker's)",
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="change a setting for the run, as an environment variable (e.g. NOTIFICATIONS_CLAIM_LEASE=10); "
            "the report lists every change. Without it the run proves project/settings.py as shipped.",
        )
        parser.add_argument(
            "--mix",
            default="",
            help="shares of the traffic's kinds, e.g. scheduled=0.12,expiring=0.12,cancelled=0.1,templated=0.08,"
            "high=0.08 (those are the defaults; the rest is plain)",
        )
        parser.add_argument("--bulk-share", type=float, default=0.5, help="share sent through the bulk backend")
        parser.add_argument("--bulk-rate", type=float, default=40.0, help="RATE_LIMIT of the bulk backend (per s)")
        parser.add_argument(
            "--burst", type=int, default=None, help="bulk notifications in one notify_many() (default 2 s of its rate)"
        )
        parser.add_argument("--redis-db", type=int, default=15)
        parser.add_argument("--poison", type=int, default=3, help="poison notifications (with the poison fault)")
        parser.add_argument("--report", default="chaos-report.json", help="where to write the JSON report")
        parser.add_argument("--keep", action="store_true", help="keep the run's database and vhost")
        parser.add_argument(
            "--broker",
            choices=["rabbitmq", "kafka"],
            default="rabbitmq",
            help="the delivery path under test (NOTIFICATIONS_BROKER; Celery's own messages stay on RabbitMQ); "
            "kafka adds the faults kafka_restart, kafka_cut and kafka_close",
        )
        parser.add_argument(
            "--kafka-bootstrap",
            default=None,
            metavar="HOST:PORT",
            help="with --broker kafka: use this Kafka broker (which the run cannot restart or cut off: its faults "
            "are skipped) instead of starting a Tansu broker of the run's own",
        )
        parser.add_argument(
            "--cluster",
            action="store_true",
            help="run against a three-node RabbitMQ cluster of the run's own on loopback (adds the faults "
            "rabbit_leader_stop and rabbit_leader_kill; rabbit_restart is left out)",
        )

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            from notifications.chaos.caller import parse_mix
            from notifications.chaos.injectors import ALL_FAULTS, KAFKA_FAULTS
            from notifications.chaos.report import render
            from notifications.chaos.run import ChaosRun, Options
        except ImportError as exc:  # aiosmtpd comes with the dev extra
            raise CommandError(f"the chaos run needs the dev extra (pip install -e '.[dev]'): {exc}") from exc
        try:
            parse_mix(o["mix"])
        except ValueError as exc:
            raise CommandError(f"--mix: {exc}") from None
        on_kafka = o["broker"] == "kafka"
        if on_kafka and o["cluster"]:
            raise CommandError("--cluster is a RabbitMQ delivery path's: not with --broker kafka")
        if o["kafka_bootstrap"] and not on_kafka:
            raise CommandError("--kafka-bootstrap needs --broker kafka")
        cluster_faults = ["rabbit_leader_stop", "rabbit_leader_kill"]
        known = [*ALL_FAULTS, *cluster_faults]
        if o["faults"] == "all":
            faults = [f for f in ALL_FAULTS if not (o["cluster"] and f == "rabbit_restart")]
            faults = [f for f in faults if on_kafka or f not in KAFKA_FAULTS]
            faults += cluster_faults if o["cluster"] else []
        elif o["faults"] == "none":
            faults = []
        else:
            faults = [f.strip() for f in o["faults"].split(",") if f.strip()]
            unknown = sorted(set(faults) - set(known))
            if unknown:
                raise CommandError(f"--faults: unknown kind(s) {unknown}; known: {', '.join(known)}")
            if not o["cluster"] and set(faults) & set(cluster_faults):
                raise CommandError("--faults: rabbit_leader_stop and rabbit_leader_kill need --cluster")
            if not on_kafka and set(faults) & set(KAFKA_FAULTS):
                raise CommandError(f"--faults: {', '.join(KAFKA_FAULTS)} need --broker kafka")
        changes = {}
        for item in o["set"]:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise CommandError(f"--set {item!r}: expected NAME=VALUE")
            changes[name] = value
        options = Options(
            n=o["n"],
            duration=o["duration"],
            seed=o["seed"],
            faults=faults,
            workers=o["workers"],
            concurrency=o["concurrency"],
            mode=o["mode"],
            fault_every=o["fault_every"],
            drain_timeout=o["drain_timeout"],
            consumer_timeout=o["consumer_timeout"],
            redis_db=o["redis_db"],
            poison=o["poison"],
            out=Path(o["report"]),
            keep=o["keep"],
            changes=changes,
            cluster=o["cluster"],
            mix=o["mix"],
            bulk_share=o["bulk_share"],
            bulk_rate=o["bulk_rate"],
            burst=o["burst"],
            broker=o["broker"],
            kafka_bootstrap=o["kafka_bootstrap"],
        )
        verdict = ChaosRun(options, log=lambda line: self.stdout.write(line)).run()
        Path(o["report"]).write_text(json.dumps({**verdict.report, "failures": verdict.failures}, indent=2))
        self.stdout.write("")
        self.stdout.write(render(verdict.report))
        self.stdout.write(f"\nreport written to {o['report']}")
        if verdict.failures:
            for failure in verdict.failures:
                self.stderr.write(f"FAIL: {failure}")
            raise CommandError("the contract was broken under faults")
        self.stdout.write(
            self.style.SUCCESS(
                "PASS: nothing lost, nothing phantom, every duplicate explained; nothing sent early, "
                "after its expiry or after an in-time cancel"
            )
        )
