"""Delivery in a process of its own, for a Kafka message that crashed its worker before.

On RabbitMQ a worker that dies mid-message costs little: the broker hands the message
to the next consumer at once, and the delivery limit ends a poison one within seconds.
On Kafka the consumer dies with the worker process, and its partitions wait for its
session to time out and the group to rebalance (about 10 s each time, and every member
of the group stops for the rebalance), so ten crashes of one poison message stall the
whole group for minutes.

So a message that was started before (a replay after a crash) is delivered here, in a
short-lived child process: if it crashes again, only the child dies, the consumer
counts the crash and tries again at once, and no rebalance happens. The child is a
plain delivery (``delivery.deliver_many``): it records, claims and sends exactly as the
worker would, with the same claims and fencing, so what it leaves behind when it dies is
what a dead worker leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .conf import settings

STARTUP_SECONDS = 30.0  # Python and Django starting in the child, on a busy host


class Crashed(Exception):
    """The child was killed by a signal before reporting (what a poison message does to
    a worker: a segfault, an abort, the kernel's OOM killer)."""

    def __init__(self, signal: int) -> None:
        super().__init__(f"the delivery process was killed by signal {signal} before reporting")
        self.signal = signal


class Failed(Exception):
    """The child could not deliver, or could not be run: its database or Redis away, an
    exit without a report (it could not start: an import error, no memory to fork), or
    no answer in time. Not counted as a crash, so that something wrong with every child
    never ends good notifications failed at the delivery limit; whatever it claimed
    lapses as a dead worker's claims do, and the caller retries the message later."""


def deliver(payloads: list[dict[str, Any]], budget: float) -> list[Any]:
    """``delivery.deliver_many(payloads, budget)`` in a child process; its outcomes.

    Raises ``Crashed`` if a signal killed the child, ``Failed`` if it reported an
    error, exited without a report, could not be run or did not answer in time."""
    from .delivery import Outcome

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    timeout = STARTUP_SECONDS + budget + 2 * float(settings.CLAIM_LEASE)
    # The report goes through a file of its own: the child's output is its logs.
    try:
        with tempfile.NamedTemporaryFile(prefix="notifications-sandbox-", suffix=".json") as report_file:
            done = subprocess.run(
                [sys.executable, "-m", "notifications.sandbox", report_file.name],
                input=json.dumps({"payloads": payloads, "budget": budget}).encode(),
                env=env,
                timeout=timeout,
                check=False,
            )
            if done.returncode < 0:
                raise Crashed(-done.returncode)
            if done.returncode > 0:
                raise Failed(f"the delivery process exited with {done.returncode} without a report")
            report = json.loads(Path(report_file.name).read_bytes())
    except subprocess.TimeoutExpired as exc:  # killed by run()
        raise Failed(f"the delivery process gave no answer within {timeout:.0f}s") from exc
    except (OSError, ValueError) as exc:
        raise Failed(f"the delivery process could not be run or read: {exc!r}") from exc
    if "error" in report:
        raise Failed(report["error"])
    return [Outcome(**o) for o in report["outcomes"]]


def main() -> None:
    import django

    django.setup()
    from .delivery import deliver_many
    from .tasks import INFRASTRUCTURE_ERRORS

    request = json.loads(sys.stdin.buffer.read())
    try:
        outcomes = deliver_many(request["payloads"], budget=float(request["budget"]))
        report: dict[str, Any] = {"outcomes": [asdict(o) for o in outcomes]}
    except INFRASTRUCTURE_ERRORS as exc:
        report = {"error": repr(exc)}
    Path(sys.argv[1]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
