"""``manage.py bench_backlog``: how the relay's claim and its cost per row grow with the
number of pending outbox rows (see project/bench/backlog.py)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from project.bench.backlog import SIZES, BacklogRun, Options, render


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise CommandError(f"--sizes: a comma-separated list of row counts, not {text!r}") from exc
    if not sizes or any(s < 0 for s in sizes):
        raise CommandError("--sizes: at least one size, none negative")
    return tuple(sorted(set(sizes)))


class Command(BaseCommand):
    help = (
        "Fill a private database's outbox with each backlog size, time the relay's claim and its "
        "throughput publishing to a private RabbitMQ vhost, and the claim again after publishing; "
        "print one table and write it as JSON."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--sizes",
            default=",".join(str(s) for s in SIZES),
            help="pending outbox rows, comma-separated (default 0,10000,100000,1000000)",
        )
        parser.add_argument("--publish", type=int, default=20000, help="rows the relay publishes per size")
        parser.add_argument("--claims", type=int, default=200, help="claim executions per measure (default 200)")
        parser.add_argument("--report", default="bench-backlog.json", help="where to write the JSON report")
        parser.add_argument("--keep", action="store_true", help="keep the run's database and vhost")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["publish"] < 1 or o["claims"] < 1:
            raise CommandError("--publish and --claims must be at least 1")
        options = Options(sizes=_sizes(o["sizes"]), publish=o["publish"], claims=o["claims"], keep=o["keep"])
        # SIGTERM ends the run like Ctrl-C: through the teardown that drops the database and vhost.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        result = BacklogRun(options, log=lambda line: self.stdout.write(line)).run()
        Path(o["report"]).write_text(json.dumps(result, indent=2))
        self.stdout.write("")
        self.stdout.write(render(result))
        self.stdout.write(f"\nwhole benchmark: {result['wall_seconds']:.0f}s; report written to {o['report']}")
