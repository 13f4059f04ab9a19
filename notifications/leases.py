"""Leases: a worker's claims stay its own exactly as long as it is alive and connected.

A claim's lease is short (``NOTIFICATIONS_CLAIM_LEASE``, 15 s), so that a worker that
dies or is cut off from PostgreSQL loses its claims within seconds and another takes
over. A live holder keeps them: a thread in each worker process renews the leases of
every claim the process holds, every ``NOTIFICATIONS_CLAIM_RENEW_INTERVAL`` seconds, in
one statement under the fencing tokens (and the Redis fast-path locks with them). A
renewal that finds a token stale marks that claim lost, and the process sends nothing
more for it.

The holder also keeps its own count of how long each lease is certainly valid: the
lease runs from the moment the database ran the statement that set it, which is after
the moment the statement was sent. A sending lane checks that count just before it
hands an email to the mail server, so a process that was paused (SIGSTOP, a long GC)
or lost its database does not start a send on a claim that may have been taken over.

Renewals stop after the task's hard time limit (a holder working that long is stuck;
the pool kills it anyway), so not even an orphaned process holds a claim for ever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import Error as DatabaseError
from django.db import close_old_connections, connections

from . import metrics
from .conf import settings

logger = logging.getLogger(__name__)


def lease_seconds() -> float:
    return float(settings.CLAIM_LEASE)


def renew_interval() -> float:
    """Seconds between renewals: ``NOTIFICATIONS_CLAIM_RENEW_INTERVAL``, by default a
    fifth of the lease, so that four renewals in a row may fail (a database stall of
    most of a lease) before a live holder loses a claim."""
    configured = settings.CLAIM_RENEW_INTERVAL
    return float(configured) if configured else lease_seconds() / 5


def max_hold() -> float:
    """How long a process renews one claim at most: the task's hard time limit."""
    from celery import current_app

    hard = current_app.conf.task_time_limit
    return float(hard) if hard else 10 * lease_seconds()


@dataclass
class _Held:
    token: int
    lock_token: bytes | None  # the Redis fast-path lock's token, if this process holds it
    since: float  # monotonic: when the claim was taken
    valid_until: float  # monotonic: the lease is certainly ours until then
    lost: bool = False
    settling: bool = False  # this process is recording its outcome: no longer a claim to keep


class Holder:
    """The claims this process holds, and the thread that renews them. One per process
    (kept with the pid: a forked child starts empty, with a thread of its own)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.pid = 0
        self.lock = threading.Lock()
        self.held: dict[str, _Held] = {}
        self.wake = threading.Event()
        self.rounds = 0  # renewal rounds that reached the database (for tests and logs)

    def _ensure_thread(self) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.held = {}
            threading.Thread(target=self._run, name="notifications-lease", daemon=True).start()

    def hold(self, claims: dict[str, int], sent_at: float, lock_tokens: dict[str, bytes] | None = None) -> None:
        """Record claims this process just took: key -> fencing token. ``sent_at`` is the
        monotonic time at which the claiming statement was sent."""
        if not claims:
            return
        lease = lease_seconds()
        with self.lock:
            self._ensure_thread()
            for key, token in claims.items():
                self.held[key] = _Held(token, (lock_tokens or {}).get(key), sent_at, sent_at + lease)

    def renewed(self, key: str, token: int, sent_at: float) -> None:
        """A statement sent at ``sent_at`` set this claim's lease anew (the send's start)."""
        with self.lock:
            held = self.held.get(key)
            if held is not None and held.token == token:
                held.valid_until = max(held.valid_until, sent_at + lease_seconds())

    def release(self, claims: Iterable[tuple[str, int]]) -> None:
        """These ``(key, token)`` claims are settled (or given up): stop renewing them. By
        token, so that a task that found a key claimed never drops another's hold on it."""
        with self.lock:
            for key, token in claims:
                held = self.held.get(key)
                if held is not None and held.token == token:
                    del self.held[key]

    def settling(self, claims: Iterable[tuple[str, int]]) -> None:
        """These ``(key, token)`` claims are about to be settled by this process. A renewal
        that meets one already settled (between the write and ``release``) then knows it
        was this process's own write, not a takeover, and neither warns nor counts it."""
        with self.lock:
            for key, token in claims:
                held = self.held.get(key)
                if held is not None and held.token == token:
                    held.settling = True

    def remaining(self, key: str, token: int) -> float:
        """Seconds this process may still act on the claim: 0 when it is lost or not held."""
        with self.lock:
            held = self.held.get(key)
            if held is None or held.token != token or held.lost:
                return 0.0
            return max(0.0, held.valid_until - time.monotonic())

    def _run(self) -> None:
        while True:
            self.wake.wait(renew_interval())
            self.wake.clear()
            try:
                self.renew()
            except Exception:  # never let the thread die: the claims would lapse while alive
                logger.exception("lease renewal failed")

    def renew(self) -> None:
        """One renewal round: every held claim younger than the hard time limit, in one
        statement; claims whose token went stale are marked lost."""
        now = time.monotonic()
        limit = max_hold()
        with self.lock:
            due = {k: h for k, h in self.held.items() if not h.lost and now - h.since < limit}
        if not due:
            return
        from .models import SentEmail

        db = settings.DATABASE
        sent_at = time.monotonic()
        try:
            kept, lost = SentEmail.objects.renew([(k, h.token) for k, h in due.items()], lease_seconds(), db)
        except DatabaseError as exc:
            # Not renewed: the lanes see the lease run out and stop sending. The next
            # round tries again on a new connection.
            logger.warning("could not renew %d claim(s): %r", len(due), exc)
            metrics.RENEWAL_FAILURES.inc()
            close_old_connections()
            connections[db].close()
            return
        self.rounds += 1
        lease = lease_seconds()
        taken: set[str] = set()
        with self.lock:
            for key, held in due.items():
                current = self.held.get(key)
                if current is not held:
                    continue  # released meanwhile: settled by this process
                if key in kept:
                    held.valid_until = max(held.valid_until, sent_at + lease)
                elif key in lost:
                    held.lost = True
                    if not held.settling:
                        taken.add(key)
        if taken:
            logger.warning("%d claim(s) taken over or settled elsewhere, e.g. %s", len(taken), next(iter(taken)))
            metrics.CLAIMS_LOST.inc(len(taken))
        from . import locks

        locks.extend({k: h.lock_token for k, h in due.items() if k in kept and h.lock_token}, lease)


holder = Holder()
os.register_at_fork(after_in_child=holder._reset)
