"""Takeover with a short lease: a live holder keeps its claims by renewing them, a dead or
cut-off one loses them within a lease of its last renewal, and a holder that may have
lost its lease sends nothing more."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from celery import current_app
from django.conf import settings
from django.db.models import F

from notifications import broker, notify, notify_many
from notifications.leases import holder
from notifications.managers import NOTIFICATION_COLUMNS
from notifications.models import Notification, SentEmail
from notifications.relay import recover_stalled
from tests import conftest
from tests.conftest import delivery_outcomes, notification_kwargs, wait_for
from tests.smtp import Plan

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = float(settings.NOTIFICATIONS_CLAIM_LEASE)


def _payload(n: Notification) -> dict:
    return {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}


def _sent(key: str, timeout: float) -> Notification:
    return wait_for(lambda: Notification.objects.filter(key=key, status="sent").first(), timeout=timeout)


def test_a_live_holder_keeps_its_claim_through_a_send_longer_than_the_lease(smtp_server, workers, redis_client):
    """The mail server takes three leases to answer. The holder renews its claim all the
    while, so a second copy of the message (its Redis lock flushed, so it asks the
    database) finds the claim live every time: one email, no takeover, nothing ambiguous."""
    slow = {"EMAIL_TIMEOUT": "60", "NOTIFICATIONS_TASK_SOFT_TIME_LIMIT": "60", "NOTIFICATIONS_TASK_TIME_LIMIT": "70"}
    workers.start(concurrency=2, **slow)
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_started(n.key)
    first = SentEmail.objects.get(key=n.key)
    redis_client.flushdb()
    broker.publish_deliveries(current_app, [_payload(n)])  # a second copy of the message
    # Renewed past the end of the first lease twice over, by the same holder.
    wait_for(
        lambda: (
            SentEmail.objects.get(key=n.key).lease_expires_at > first.lease_expires_at + timedelta(seconds=2 * LEASE)
        ),
        timeout=4 * LEASE,
        what="the holder renewing its lease",
    )
    claim = SentEmail.objects.get(key=n.key)
    assert (claim.state, claim.token, claim.owner) == ("claimed", 1, first.owner)
    assert "retry" in delivery_outcomes(n.key) or Notification.objects.get(key=n.key).status == "sending"
    release.set()
    sent = _sent(n.key, timeout=30)
    wait_for(lambda: "duplicate" in delivery_outcomes(n.key), timeout=4 * LEASE, what="the copy found it sent")
    assert smtp_server.count(n.key) == 1
    assert sent.ambiguous_count == 0 and SentEmail.objects.get(key=n.key).token == 1


def test_a_killed_worker_is_taken_over_within_the_lease(smtp_server, workers):
    """SIGKILL of a worker mid-send while another runs: its message goes to the other at
    once, which takes the claim over as soon as the dead one's lease runs out."""
    first = workers.start(concurrency=1)
    workers.start(concurrency=1)
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=False))
    smtp_server.wait_started(n.key)
    owner = SentEmail.objects.get(key=n.key).owner
    victim = next(w for w in workers.started if int(owner.rsplit(":", 1)[1]) in w.children())
    victim.kill()
    killed = time.monotonic()
    release.set()
    sent = _sent(n.key, timeout=3 * LEASE)
    took = time.monotonic() - killed
    assert smtp_server.count(n.key) == 1 and sent.ambiguous_count == 1
    assert SentEmail.objects.get(key=n.key).token == 2
    assert took < 2 * LEASE, f"taken over {took:.1f}s after the kill (lease {LEASE}s)"
    del first


def test_a_worker_cut_off_from_postgresql_is_taken_over_and_sends_nothing_more(smtp_server, workers):
    """The database line of a worker goes dead in the middle of a batch (nothing closes,
    nothing answers). Its claims lapse; recovery gives them new messages; another worker
    sends each once, the one whose send had started counted ambiguous. The cut-off
    worker starts no new send, and once its line is back its late writes are refused."""
    from notifications.chaos.netcut import LineCut

    line = LineCut(port=5432).start()
    try:
        cut_off = conftest.test_database_url().replace(":5432/", f":{line.port}/")
        workers.start(concurrency=1, DATABASE_URL=cut_off, NOTIFICATIONS_SEND_CONCURRENCY="1")
        base = notification_kwargs()["notification_id"]  # keys in send order (a batch goes in key order)
        rows = [notification_kwargs(notification_id=f"{base}-{i}", user_id=str(i)) for i in range(3)]
        keys = [n.key for n in notify_many(rows)]
        release = threading.Event()
        smtp_server.plan(keys[0], Plan(hold=release, keep=True))
        smtp_server.wait_started(keys[0])
        line.cut()
        cut_at = time.monotonic()
        release.set()  # the server accepts; the worker cannot record it
        workers.start(concurrency=1)

        def delivered() -> bool:
            recover_stalled()  # what beat runs every NOTIFICATIONS_RECOVER_INTERVAL
            return Notification.objects.filter(key__in=keys, status="sent").count() == 3

        wait_for(delivered, timeout=3 * LEASE + 20, interval=0.5, what="the cut-off worker's notifications sent")
        took = time.monotonic() - cut_at
        first = Notification.objects.get(key=keys[0])
        records = list(SentEmail.objects.filter(key__in=keys).values_list("key", "token", "owner", "response"))
        assert smtp_server.count(keys[0]) == 2, records
        assert first.ambiguous_count == 1  # its send had started
        assert all(smtp_server.count(k) == 1 for k in keys[1:])  # never started by the cut-off worker
        assert set(Notification.objects.filter(key__in=keys[1:]).values_list("ambiguous_count", flat=True)) == {0}
        assert took < 3 * LEASE + 10, f"taken over {took:.1f}s after the cut (lease {LEASE}s)"
        line.restore()
        owners = set(SentEmail.objects.filter(key__in=keys).values_list("token", "state"))
        assert owners == {(2, "sent")}, records
    finally:
        line.stop()
    for key in keys:
        assert smtp_server.count(key) == (2 if key == keys[0] else 1)


def test_a_lane_sends_nothing_once_its_lease_may_have_run_out(smtp_server):
    """A process paused (or cut off) between stamping a send and sending it must not
    send: the lease it last renewed may be someone else's by now."""
    from notifications import delivery

    n = notify(**notification_kwargs())
    stale = time.monotonic() - LEASE  # the lease was last renewed a whole lease ago
    holder.hold({n.key: 7}, sent_at=stale)
    try:
        item = delivery._Item(_payload(n), token=7, attempts=0, ambiguous=False)
        finish, outcome, reachable = delivery._attempt(item, LEASE)
    finally:
        holder.release([(n.key, 7)])
    assert (finish.state, outcome.status, finish.attempts) == ("released", "retry", 0)
    assert "lease" in outcome.detail
    assert smtp_server.count(n.key) == 0


def test_renewals_stop_after_the_hard_time_limit():
    """A holder that has worked on a claim for longer than the task may run (an orphaned
    pool process, a stuck thread) stops renewing it, so even it cannot keep it for ever."""
    from notifications.leases import max_hold

    fresh, stuck = notify(**notification_kwargs()), notify(**notification_kwargs())
    SentEmail.objects.claim_many([(fresh.key, fresh.pk), (stuck.key, stuck.pk)], "here:1", LEASE, "default")
    before = dict(SentEmail.objects.filter(key__in=[fresh.key, stuck.key]).values_list("key", "lease_expires_at"))
    now = time.monotonic()
    holder.hold({fresh.key: 1}, sent_at=now)
    holder.hold({stuck.key: 1}, sent_at=now - max_hold() - 1)
    try:
        holder.renew()
    finally:
        holder.release([(fresh.key, 1), (stuck.key, 1)])
    after = dict(SentEmail.objects.filter(key__in=[fresh.key, stuck.key]).values_list("key", "lease_expires_at"))
    assert after[fresh.key] > before[fresh.key]
    assert after[stuck.key] == before[stuck.key]


def test_a_renewal_meeting_this_process_own_settled_claim_counts_no_takeover():
    """Between a lane's outcome write and its release of the hold, a renewal finds the
    claim settled: that is this process's own write, so it stops renewing it without the
    "taken over" warning or a claims-lost count; a real takeover still counts."""
    from prometheus_client import REGISTRY

    def lost_total() -> float:
        return REGISTRY.get_sample_value("notifications_claims_lost_total") or 0.0

    own, taken = notify(**notification_kwargs()), notify(**notification_kwargs())
    claims = SentEmail.objects.claim_many([(own.key, own.pk), (taken.key, taken.pk)], "here:1", LEASE, "default")
    holder.hold({own.key: claims[own.key].token, taken.key: claims[taken.key].token}, sent_at=time.monotonic())
    before = lost_total()
    try:
        holder.settling([(own.key, claims[own.key].token)])
        SentEmail.objects.filter(key=own.key).update(state="released")  # this process's outcome write
        SentEmail.objects.filter(key=taken.key).update(token=F("token") + 1)  # another worker took it over
        holder.renew()
        assert holder.remaining(own.key, claims[own.key].token) == 0
        assert holder.remaining(taken.key, claims[taken.key].token) == 0
        assert lost_total() - before == 1
    finally:
        holder.release([(own.key, claims[own.key].token), (taken.key, claims[taken.key].token)])
