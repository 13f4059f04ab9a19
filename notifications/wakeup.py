"""How a commit of ``notify()`` reaches the relay loop in beat (``NOTIFICATIONS_RELAY_WAKEUP``).

- ``"listen"``: the insert statement itself calls ``pg_notify``, so PostgreSQL tells
  the loop (which ``LISTEN``s on each relay database) when, and only when, the
  caller's transaction commits: no round trip, no thread and no Redis in the caller, a
  rollback wakes nobody, and manual transaction management needs no hook.
- ``"redis"``: after the commit a background thread of the caller pushes to a Redis
  list the loop blocks on (``relay._Waker``).
- ``"poll"``: nobody wakes the loop; it looks every ``NOTIFICATIONS_RELAY_POLL``
  seconds.

Whatever the mode, a lost wake-up costs at most ``NOTIFICATIONS_RELAY_INTERVAL``: the
loop passes at least that often, and beat's scheduled relay task passes while no loop
runs. The other wake-ups (a retry due now, recovered notifications, a pass out of time)
are rare and keep ``relay.wake_relay``'s Redis flag and fallback to a worker's task;
under ``"listen"`` they reach the loop as a ``NOTIFY`` too.
"""

from __future__ import annotations

import hashlib
import logging
import select
import time
from typing import Any

from .conf import settings

logger = logging.getLogger(__name__)

MODES = ("listen", "redis", "poll")


def mode() -> str:
    return str(settings.RELAY_WAKEUP)


def channel() -> str:
    """The ``LISTEN`` channel of this service's relay: named, like its Redis keys, by its
    relay queue and the databases it relays, so services sharing a database never wake
    each other. A plain identifier (no quoting needed), under PostgreSQL's 63 bytes."""
    from .relay import WAKE_LIST, key

    return "notifications_" + hashlib.sha256(key(WAKE_LIST).encode()).hexdigest()[:24]


def in_insert() -> str | None:
    """The channel ``notify()``'s insert statement notifies, or None (not ``"listen"``,
    or ``NOTIFICATIONS_RELAY_ON_COMMIT`` off)."""
    if mode() != "listen" or not settings.RELAY_ON_COMMIT:
        return None
    return channel()


def notify(using: str) -> None:
    """Wake the loop through ``using``'s PostgreSQL (on commit, inside a transaction)."""
    from django.db import connections, transaction

    conn = connections[using]
    if conn.in_atomic_block:
        transaction.on_commit(lambda: notify(using), using=using)
        return
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [channel()])


class Listener:
    """The relay loop's ``LISTEN`` connections, one per relay database, outside Django's
    connection handling (a connection that only waits must not be closed between
    passes, nor share a transaction with them)."""

    def __init__(self, aliases: list[str]) -> None:
        self.aliases = aliases
        self.conns: dict[str, Any] = {}

    def _connect(self) -> bool:
        """Open and ``LISTEN`` where missing; True if any was (re)opened, so that the pass
        after it covers the commits no connection was there to hear."""
        from django.db import connections

        opened = False
        for alias in self.aliases:
            if alias in self.conns:
                continue
            wrapper = connections.create_connection(alias)
            try:
                raw = wrapper.get_new_connection(wrapper.get_connection_params())
                raw.autocommit = True
                raw.execute(f"LISTEN {channel()}")
            except Exception as exc:  # the next wait tries again; passes go on by the interval
                logger.warning("relay loop cannot LISTEN on %s: %r", alias, exc)
                continue
            self.conns[alias] = raw
            opened = True
        return opened

    def wait(self, timeout: float) -> bool:
        """Block until a ``NOTIFY`` on any relay database, or ``timeout`` seconds; take every
        notification waiting (they asked for the pass that follows). True if woken."""
        if self._connect():
            return True
        if not self.conns:
            time.sleep(min(timeout, 1.0))
            return False
        by_fd = {raw.fileno(): alias for alias, raw in self.conns.items()}
        try:
            ready, _, _ = select.select(list(by_fd), [], [], max(timeout, 0.0))
        except (OSError, ValueError):
            ready = list(by_fd)
        woken = False
        for fd in ready:
            alias = by_fd[fd]
            try:
                # Every notification waiting, not only the first: the rest would wake
                # the loop again for the pass it is about to make.
                woken = sum(1 for _ in self.conns[alias].notifies(timeout=0)) > 0 or woken
            except Exception as exc:  # server gone: reconnect on the next wait
                logger.warning("relay loop lost its LISTEN connection to %s: %r", alias, exc)
                self._drop(alias)
                woken = True
        return woken

    def _drop(self, alias: str) -> None:
        raw = self.conns.pop(alias, None)
        if raw is not None:
            try:
                raw.close()
            except Exception:
                pass

    def close(self) -> None:
        for alias in list(self.conns):
            self._drop(alias)
