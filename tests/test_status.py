"""The operator's figures (notifications.status): what the dashboard, the command line
and the metrics gauges report must match the rows in the database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from notifications import notify, status
from notifications.models import Notification, OutboxMessage, SentEmail
from tests.conftest import notification_kwargs

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_relay(settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


def test_counts_backlog_lag_held_and_stuck_claims_match_the_rows():
    now = timezone.now()
    made = [notify(**notification_kwargs()) for _ in range(5)]
    # Two sent, 2 s and 10 s after their commit; one failed; one held; one still pending.
    for n, seconds in zip(made[:2], (2, 10), strict=True):
        Notification.objects.filter(pk=n.pk).update(
            status="sent", created_at=now - timedelta(seconds=seconds), sent_at=now
        )
        OutboxMessage.objects.filter(notification=n).update(published_at=now)
    Notification.objects.filter(pk=made[2].pk).update(status="failed", last_error="550 no such user")
    OutboxMessage.objects.filter(notification=made[2]).update(published_at=now)
    Notification.objects.filter(pk=made[3].pk).update(status="ambiguous")
    OutboxMessage.objects.filter(notification=made[3]).update(published_at=now)
    # The fifth waits, written 30 s ago; a retry of the third is due in an hour.
    OutboxMessage.objects.filter(notification=made[4]).update(created_at=now - timedelta(seconds=30))
    OutboxMessage.objects.create(notification=made[2], due_at=now + timedelta(hours=1))
    SentEmail.objects.create(key=made[3].key, state="claimed", lease_expires_at=now - timedelta(seconds=60))

    snap = status.snapshot()

    assert snap.counts["created"] == 1 and snap.counts["sent"] == 2 and snap.counts["failed"] == 1
    assert snap.counts["ambiguous"] == 1 and snap.counts["retrying"] == 0
    assert snap.backlog.due == 1 and snap.backlog.scheduled == 1
    assert 29 <= snap.backlog.oldest_due_age < 60
    assert snap.lag.count == 2 and snap.lag.max == pytest.approx(10, abs=0.5)
    assert snap.lag.p50 == pytest.approx(6, abs=0.5)
    assert snap.held == 1 and snap.stuck_claims == 1
    assert snap.scheduled.waiting == 1 and snap.scheduled.by_priority == {"normal": 1, "high": 0}
    assert status.failures_by_reason() == [("550 no such user", 1)]
    per_minute = status.sent_per_minute(60)
    assert len(per_minute) == 60 and sum(c for _, c in per_minute) == 2
    assert dict(per_minute)[now.replace(second=0, microsecond=0)] == 2
    assert snap.as_dict()["backlog"]["due"] == 1


def test_an_empty_pipeline_reports_zeros_and_no_ages():
    snap = status.snapshot()
    assert set(snap.counts.values()) == {0}
    assert snap.backlog.oldest_due_age is None and snap.lag.p99 is None and snap.lag.count == 0
    assert (snap.scheduled.waiting, snap.scheduled.next_due_at, snap.scheduled.next_due_in) == (0, None, None)
    assert snap.as_dict()["scheduled"] == {
        "waiting": 0,
        "by_priority": {"normal": 0, "high": 0},
        "next_due_at": None,
        "next_due_in": None,
    }


def test_what_waits_for_later_by_priority_and_when_the_next_falls_due():
    from notifications import cancel

    now = timezone.now()
    notify(**notification_kwargs(send_at=now + timedelta(hours=2)))
    notify(**notification_kwargs(send_at=now + timedelta(minutes=30), priority="high"))
    stopped = notify(**notification_kwargs(send_at=now + timedelta(minutes=1)))
    assert cancel(stopped.key).in_time  # its outbox row goes: nothing waits for it
    retried = notify(**notification_kwargs())  # due now; and a retry of it due in 5 minutes
    retry = OutboxMessage.objects.create(notification=retried, due_at=now + timedelta(minutes=5))
    expired = notify(**notification_kwargs())
    Notification.objects.filter(pk=expired.pk).update(status="expired")
    OutboxMessage.objects.filter(notification=expired).update(published_at=now)

    later = status.scheduled()
    assert later.waiting == 3 and later.by_priority == {"normal": 2, "high": 1}
    assert later.next_due_at == retry.due_at
    assert later.next_due_in == pytest.approx(300, abs=5)
    snap = status.snapshot()
    assert snap.counts["scheduled"] == 2 and snap.counts["cancelled"] == 1 and snap.counts["expired"] == 1
    assert snap.counts["created"] == 1 and sum(snap.counts.values()) == 5
    assert snap.backlog.scheduled == later.waiting and snap.backlog.due == 1
    assert snap.as_dict()["scheduled"]["next_due_at"] == retry.due_at.isoformat()
