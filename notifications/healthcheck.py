"""The worker's health check: the worker touches ``NOTIFICATIONS_WORKER_ALIVE_FILE``
every ``NOTIFICATIONS_WORKER_ALIVE_INTERVAL`` seconds while its consumer is connected to
the broker, and ``python -m notifications.healthcheck`` exits 0 while the file is fresh,
1 once it is stale or missing (a docker-compose ``healthcheck`` or a Kubernetes
``exec`` probe).

Why a file and not ``celery inspect ping``: the ping is a broadcast through the broker
and a reply, a second or more per probe, costing a broker connection each time and
failing for every worker at once when the broker blips. The file is touched from the
worker's own event loop, so it also goes stale when that loop hangs, and reading it
costs nothing.

Beat's check, ``python -m notifications.healthcheck --relay-loop``, reads the heartbeat
the relay loop in beat already keeps in Redis for the on-commit wake-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import bootsteps
from django.core.exceptions import ImproperlyConfigured

from .conf import settings

logger = logging.getLogger(__name__)

STALE_AFTER_INTERVALS = 5  # the check's default window, in touch intervals


class AliveFile(bootsteps.StartStopStep):
    """A worker consumer step: touch the alive file now and then every interval, from
    the consumer's timer (the worker's event loop), while the consumer runs.

    Celery stops the consumer's steps when the broker connection is lost and starts
    them again once it is back, so the file goes stale while the worker cannot
    receive messages, and when its event loop hangs.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)  # touching starts once it consumes

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path = settings.WORKER_ALIVE_FILE
        self.timer_entry: Any = None
        self.failing = False  # warn once per failure, not every interval

    def start(self, c: Any) -> None:
        if not self.path:
            return
        self._touch(c)
        interval = float(settings.WORKER_ALIVE_INTERVAL)
        self.timer_entry = c.timer.call_repeatedly(interval, self._touch, (c,))

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _touch(self, c: Any) -> None:
        connection = c.connection
        if connection is None or not connection.connected:
            return
        try:
            Path(self.path).touch()
        except OSError as exc:  # a health check that cannot write reports the worker stale
            if not self.failing:
                logger.warning("cannot touch the worker's alive file %s: %s", self.path, exc)
            self.failing = True
        else:
            self.failing = False


def age(path: str) -> float | None:
    """Seconds since ``path`` was last touched; None if it does not exist."""
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def relay_loop_alive() -> bool:
    """Whether beat's relay loop shows its heartbeat in Redis (refreshed after every
    pass that could publish; see ``relay.relay_forever``)."""
    import django

    django.setup()
    from .relay import loop_alive

    return loop_alive()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 if the alive file was touched within ``--max-age`` seconds (or,
    with ``--relay-loop``, if beat's relay loop shows its heartbeat), else 1 with the
    reason on stderr."""
    parser = argparse.ArgumentParser(prog="python -m notifications.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--file", help="the alive file (default: the NOTIFICATIONS_WORKER_ALIVE_FILE setting)")
    parser.add_argument(
        "--relay-loop",
        action="store_true",
        help="check beat instead: its relay loop's heartbeat in Redis (needs DJANGO_SETTINGS_MODULE)",
    )
    parser.add_argument(
        "--max-age",
        type=float,
        help=f"seconds (default: {STALE_AFTER_INTERVALS} x NOTIFICATIONS_WORKER_ALIVE_INTERVAL, 10 with the defaults)",
    )
    options = parser.parse_args(argv)
    if options.relay_loop:
        if relay_loop_alive():
            return 0
        print("unhealthy: no relay loop heartbeat (beat stopped, or its passes fail)", file=sys.stderr)
        return 1
    try:
        path = options.file or settings.WORKER_ALIVE_FILE
        max_age = options.max_age or STALE_AFTER_INTERVALS * float(settings.WORKER_ALIVE_INTERVAL)
    except ImproperlyConfigured as exc:  # a setting asked for, and no DJANGO_SETTINGS_MODULE
        print(f"pass --file and --max-age, or set DJANGO_SETTINGS_MODULE ({exc})", file=sys.stderr)
        return 1
    if not path:
        print("no alive file: pass --file or set NOTIFICATIONS_WORKER_ALIVE_FILE", file=sys.stderr)
        return 1
    seconds = age(path)
    if seconds is None:
        print(f"unhealthy: {path} does not exist (worker not started, or not connected yet)", file=sys.stderr)
        return 1
    if seconds > max_age:
        print(f"unhealthy: {path} last touched {seconds:.1f}s ago (more than {max_age:g}s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
