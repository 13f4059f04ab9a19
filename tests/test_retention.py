"""Retention (notifications.retention): what is past its time goes with its outbox rows,
nothing else does, and a purge neither waits for rows others hold nor holds up notify()."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from notifications import notify, retention, tasks
from notifications.checks import check_pipeline
from notifications.models import Notification, OutboxMessage, SentEmail
from tests import conftest
from tests.conftest import notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_relay(settings: Any) -> None:
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


def made(
    status: str,
    days_ago: float,
    record: str | None = None,
    record_days_ago: float | None = None,
    published: bool = True,
) -> Notification:
    """A notification created ``days_ago`` with its outbox row (published then, unless not),
    and a sent-email record in state ``record`` last written ``record_days_ago``."""
    n = notify(**notification_kwargs())
    at = timezone.now() - timedelta(days=days_ago)
    Notification.objects.filter(pk=n.pk).update(status=status, created_at=at, updated_at=at)
    OutboxMessage.objects.filter(notification=n).update(created_at=at, published_at=at if published else None)
    if record:
        written = timezone.now() - timedelta(days=days_ago if record_days_ago is None else record_days_ago)
        SentEmail.objects.create(key=n.key, notification=n, state=record)
        SentEmail.objects.filter(key=n.key).update(updated_at=written)
    return n


def exists(n: Notification) -> bool:
    return Notification.objects.filter(pk=n.pk).exists()


def test_finished_notifications_past_retention_go_with_their_outbox_rows_and_records() -> None:
    old_sent = made("sent", 40, record="sent")
    old_failed = made("failed", 35, record="failed")
    never_claimed = made("failed", 31)  # failed before any claim (refused by the broker)
    # The outbox row of a retry published recently: too young for the outbox pass, but
    # it goes with its notification.
    retried = made("failed", 45)
    OutboxMessage.objects.create(notification=retried, published_at=timezone.now() - timedelta(days=2))

    recent = made("sent", 5, record="sent")
    held = made("ambiguous", 60, record="held")  # a person decides, never the purge
    pending = made("created", 40, published=False)
    # Created long ago, finished (retried by a person) ten days ago: its record is young,
    # so the notification stays while the record does.
    finished_late = made("sent", 50, record="sent", record_days_ago=10)
    # Final, but with an unpublished outbox row (a retry queued): left for the relay.
    queued_again = made("failed", 40)
    OutboxMessage.objects.create(notification=queued_again)

    result = retention.purge()

    for gone in (old_sent, old_failed, never_claimed, retried):
        assert not exists(gone), gone.key
        assert not OutboxMessage.objects.filter(notification_id=gone.pk).exists()
    assert not SentEmail.objects.filter(key__in=[old_sent.key, old_failed.key]).exists()
    for kept in (recent, held, pending, finished_late, queued_again):
        assert exists(kept), kept.key
    assert SentEmail.objects.filter(key__in=[recent.key, held.key, finished_late.key]).count() == 3
    # Published outbox rows past the sent-email retention go in any case; the rest stay.
    assert OutboxMessage.objects.filter(notification__in=[recent, pending]).count() == 2
    assert not OutboxMessage.objects.filter(notification__in=[held, finished_late]).exists()
    assert list(OutboxMessage.objects.filter(notification=queued_again).values_list("published_at", flat=True)) == [
        None
    ]
    assert (result.notifications, result.sent, result.outbox, result.skipped) == (4, 2, 8, 0)


def test_a_dry_run_counts_the_same_rows_and_deletes_nothing() -> None:
    made("sent", 40, record="sent")
    made("failed", 31)
    made("sent", 3, record="sent")
    before = (Notification.objects.count(), OutboxMessage.objects.count(), SentEmail.objects.count())

    dry = retention.purge(dry_run=True)

    assert (Notification.objects.count(), OutboxMessage.objects.count(), SentEmail.objects.count()) == before
    real = retention.purge()
    assert (dry.notifications, dry.sent, dry.outbox) == (real.notifications, real.sent, real.outbox) == (2, 1, 2)


def test_batches_walk_every_row_once() -> None:
    rows = [made("sent", 40) for _ in range(7)]
    keep = made("sent", 40, record="sent", record_days_ago=1)  # in the middle of the range
    seen: list[tuple[str, int, int]] = []

    result = retention.purge(batch=3, progress=lambda *args: seen.append(args))

    assert not any(exists(n) for n in rows) and exists(keep)
    assert [s for s in seen if s[0] == "notifications"][-1][2] == 7
    assert result.notifications == 7 and result.batches >= 3


def test_rows_another_transaction_holds_are_skipped_without_waiting() -> None:
    locked = made("sent", 40)
    record_locked = made("failed", 40, record="failed")
    free = made("sent", 40, record="sent")
    with psycopg.connect(conftest.test_database_url()) as other:  # a worker or the admin, mid-transaction
        other.execute(f"SELECT 1 FROM {Notification._meta.db_table} WHERE id = %s FOR UPDATE", [locked.pk])
        other.execute(f"SELECT 1 FROM {SentEmail._meta.db_table} WHERE key = %s FOR UPDATE", [record_locked.key])
        started = time.monotonic()
        result = retention.purge()
        took = time.monotonic() - started
        other.rollback()
    assert took < 1.5, f"the purge waited {took:.1f}s"  # below the 2 s lock timeout: it never waited
    assert exists(locked) and exists(record_locked) and not exists(free)
    # The held record kept its notification too: a notification never outlives its record.
    assert SentEmail.objects.filter(key=record_locked.key).exists()
    assert result.notifications == 1 and result.skipped == 0
    # The next run takes what was skipped.
    assert retention.purge().notifications == 2


def test_notify_is_not_held_up_by_an_open_purge_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge batch keeps its transaction open (rows locked and deleted, not yet
    committed) while notify() runs in another: notify() neither waits nor fails."""
    old = [made("sent", 40, record="sent") for _ in range(3)]
    inside, release = threading.Event(), threading.Event()
    original = retention._Pass.run

    def run(self: Any, select: str, params: dict[str, Any], delete: Any) -> None:
        def held_open(cursor: Any, ids: list[int]) -> int:
            count = delete(cursor, ids)
            if self.name == "notifications":
                inside.set()
                release.wait(10)
            return count

        original(self, select, params, held_open)

    monkeypatch.setattr(retention._Pass, "run", run)
    results: list[retention.PurgeResult] = []

    def purge() -> None:
        try:
            results.append(retention.purge())
        finally:
            connection.close()

    thread = threading.Thread(target=purge)
    thread.start()
    try:
        assert inside.wait(10), "the purge never reached its notifications batch"
        started = time.monotonic()
        fresh = notify(**notification_kwargs())
        took = time.monotonic() - started
    finally:
        release.set()
        thread.join(10)
    assert took < 0.5, f"notify() took {took:.2f}s during the purge"
    assert exists(fresh) and OutboxMessage.objects.filter(notification=fresh).exists()
    assert results and results[0].notifications == 3 and not any(exists(n) for n in old)


def test_the_beat_task_runs_the_purge() -> None:
    old = made("sent", 40, record="sent")
    recent = made("sent", 1, record="sent")
    counts = tasks.purge.apply().get()
    assert (counts["notifications"], counts["sent"], counts["outbox"]) == (1, 1, 1)
    assert not exists(old) and exists(recent)


def test_a_repeat_after_the_window_sends_again(smtp_server: Any, module_worker: Any, settings: Any) -> None:
    """The trade-off the README states: once the notification and its record are gone, the
    same key is a new notification and a new email (never one a worker refuses to send)."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = True
    kwargs = notification_kwargs()
    first = notify(**kwargs)
    smtp_server.wait_received(first.key)
    wait_for(lambda: Notification.objects.filter(pk=first.pk, status="sent").exists(), what="sent")
    long_ago = timezone.now() - timedelta(days=31)
    Notification.objects.filter(pk=first.pk).update(created_at=long_ago)
    OutboxMessage.objects.filter(notification=first).update(published_at=long_ago)
    SentEmail.objects.filter(key=first.key).update(updated_at=long_ago)
    assert notify(**kwargs).pk == first.pk  # within the window: the same notification

    assert retention.purge().notifications == 1
    again = notify(**kwargs)

    assert again.pk != first.pk and again.key == first.key
    wait_for(lambda: smtp_server.count(first.key) == 2, what=lambda: f"{smtp_server.count(first.key)} emails")
    wait_for(lambda: Notification.objects.filter(pk=again.pk, status="sent").exists(), what="sent again")


def test_notifications_may_not_be_kept_shorter_than_their_records(settings: Any) -> None:
    settings.NOTIFICATIONS_RETENTION_DAYS = 7
    [error] = check_pipeline()
    assert error.id == "notifications.E015" and "NOTIFICATIONS_SENT_RETENTION_DAYS (30)" in error.msg
    settings.NOTIFICATIONS_SENT_RETENTION_DAYS = 7
    assert check_pipeline() == []
    settings.NOTIFICATIONS_PURGE_BATCH_SIZE = 0
    assert [e.id for e in check_pipeline()] == ["notifications.E011"]


def test_a_repeat_whose_notification_is_purged_meanwhile_is_created_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """The insert skips a key that exists; if retention deletes that notification before
    notify() reads it back, the key is free and notify() creates it, instead of raising."""
    old = made("sent", 40)
    manager = type(Notification.objects)
    original = manager._insert_chunks
    calls: list[int] = []

    def purged_after_first_insert(self: Any, ordered: Any, using: str) -> Any:
        result = original(self, ordered, using)
        if not calls:
            calls.append(1)
            dsn = conftest.test_database_url()
            with psycopg.connect(dsn, autocommit=True) as other:  # retention, in its own transaction
                other.execute("DELETE FROM notifications_outboxmessage WHERE notification_id = %s", [old.pk])
                other.execute("DELETE FROM notifications_notification WHERE id = %s", [old.pk])
        return result

    monkeypatch.setattr(manager, "_insert_chunks", purged_after_first_insert)
    again = notify(**notification_kwargs(notification_id=old.notification_id, user_id=old.user_id))

    assert again.key == old.key and again.pk != old.pk
    assert Notification.objects.get(key=old.key).status == "created"
    assert OutboxMessage.objects.filter(notification=again, published_at__isnull=True).count() == 1
