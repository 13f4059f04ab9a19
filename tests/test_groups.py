"""Outcome records in groups (``NOTIFICATIONS_RECORD_GROUP``): a sending connection
stamps a group's starts in one statement and records its outcomes in the next. A worker
that dies inside a group leaves every email of it unknown: the takeover counts each one
ambiguous (hold mode holds them all, none is sent twice); with groups of one only the
email being sent is. A slow mail server gets groups of one."""

from __future__ import annotations

from typing import Any

import pytest

from notifications import notify, notify_many
from notifications.managers import Finish, Start
from notifications.models import Notification, SentEmail
from tests.conftest import notification_kwargs, unique, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

FINISHED = {"sent", "ambiguous", "failed"}


def ten(base: str) -> list[dict[str, Any]]:
    return [notification_kwargs(notification_id=f"{base}-{i:02d}") for i in range(10)]


def statuses(keys: list[str]) -> dict[str, str]:
    return dict(Notification.objects.filter(key__in=keys).values_list("key", "status"))


def crash_in_the_sixth(smtp_server: Any, workers: Any, **env: str) -> tuple[list[str], dict[str, str]]:
    """Ten notifications in one message to one sending connection; the worker dies as it
    is about to send the sixth; an unarmed worker takes over after the lease. Returns
    the keys and their statuses once all are finished."""
    base = unique()
    items = ten(base)
    keys = [f"tests:{item['notification_id']}:42" for item in items]
    first = workers.start(
        concurrency=1,
        NOTIFICATIONS_SEND_CONCURRENCY="1",
        NOTIFICATIONS_AMBIGUOUS="hold",
        NOTIFICATIONS_CRASH_POINTS=f"before_send=tests:{base}-05:",
        **env,
    )
    notify_many(items)
    wait_for(lambda: "SIGKILL" in first.output() or "Process 'ForkPoolWorker" in first.output(), timeout=30)
    first.kill()
    workers.start(NOTIFICATIONS_AMBIGUOUS="hold")

    def finished() -> dict[str, str] | None:
        now = statuses(keys)
        return now if len(now) == 10 and set(now.values()) <= FINISHED else None

    return keys, wait_for(finished, timeout=60, what=lambda: statuses(keys))


def test_a_worker_dying_inside_a_group_leaves_the_whole_group_held(smtp_server, workers):
    # A group budget far above any send here, so the nine after the first are one group.
    keys, final = crash_in_the_sixth(smtp_server, workers, NOTIFICATIONS_RECORD_GROUP_MS="1000")
    # The first email was a group of its own (no send timed yet) and was recorded; the
    # next nine were stamped together: four sent, unrecorded, and five never tried.
    assert final[keys[0]] == "sent"
    assert [final[k] for k in keys[1:]] == ["ambiguous"] * 9
    assert [smtp_server.count(k) for k in keys] == [1] * 5 + [0] * 5  # hold: nothing sent twice
    assert all(n.ambiguous_count == 1 for n in Notification.objects.filter(key__in=keys[1:]))


def test_groups_of_one_leave_only_the_email_being_sent_unknown(smtp_server, workers):
    keys, final = crash_in_the_sixth(smtp_server, workers, NOTIFICATIONS_RECORD_GROUP="1")
    assert final[keys[5]] == "ambiguous"
    assert all(final[k] == "sent" for i, k in enumerate(keys) if i != 5)
    assert [smtp_server.count(k) for k in keys] == [1] * 5 + [0] + [1] * 4


def test_a_slow_mail_server_gets_groups_of_one(smtp_server, workers):
    """Sends slower than RECORD_GROUP_MS: each outcome is recorded before the next send,
    so the crash leaves only the sixth unknown, as with groups of one."""
    smtp_server.add_weather("slow", 1.0, 120, delay=0.05)  # 50 ms per email, the group budget 20 ms
    try:
        keys, final = crash_in_the_sixth(smtp_server, workers, NOTIFICATIONS_RECORD_GROUP_MS="20")
    finally:
        with smtp_server.handler.lock:
            smtp_server.handler.weather.clear()
    assert final[keys[5]] == "ambiguous"
    assert all(final[k] == "sent" for i, k in enumerate(keys) if i != 5)


def test_one_statement_records_many_outcomes_and_stamps_many_starts_under_their_tokens():
    """The statement a lane runs between groups: each outcome and each start is written
    under its own fencing token, per key; a stale token writes nothing for that key."""
    ns = [notify(**notification_kwargs()) for _ in range(6)]
    claims = SentEmail.objects.claim_many([(n.key, n.pk) for n in ns], "host:1", 60, "default")
    token = {n.key: claims[n.key].token for n in ns}
    done, later = ns[:3], ns[3:]
    assert SentEmail.objects.settle_group(
        [], [Start(n.key, token[n.key], 60, n.message_id) for n in done], "default"
    ) == (set(), {n.key for n in done})
    finished = [
        Finish(done[0].key, token[done[0].key], "sent", "250 ok", attempts=1),
        Finish(done[1].key, token[done[1].key], "released", "not attempted: budget", attempts=0),
        Finish(done[2].key, token[done[2].key] + 7, "sent", "250 ok", attempts=1),  # stale: another worker's now
    ]
    starts = [Start(n.key, token[n.key], 60, n.message_id) for n in later[:2]]
    starts.append(Start(later[2].key, token[later[2].key] + 7, 60, later[2].message_id))  # stale
    written, started = SentEmail.objects.settle_group(finished, starts, "default")
    assert written == {done[0].key, done[1].key}
    assert started == {later[0].key, later[1].key}
    rows = {r.key: r for r in SentEmail.objects.filter(key__in=[n.key for n in ns])}
    assert (rows[done[0].key].state, rows[done[0].key].send_started_at) == ("sent", None)
    # Released untried: the start's attempt is taken back, and its stamp cleared.
    assert (rows[done[1].key].state, rows[done[1].key].attempts, rows[done[1].key].send_started_at) == (
        "released",
        0,
        None,
    )
    assert rows[done[2].key].state == "claimed" and rows[done[2].key].send_started_at is not None
    assert all(rows[n.key].send_started_at is not None and rows[n.key].attempts == 1 for n in later[:2])
    assert rows[later[2].key].send_started_at is None and rows[later[2].key].attempts == 0
    statuses = dict(Notification.objects.filter(pk__in=[n.pk for n in done]).values_list("key", "status"))
    assert statuses[done[0].key] == "sent" and statuses[done[1].key] == "retrying"


@pytest.mark.parametrize("value", [-1, 1001, "20", True, None])
def test_the_group_time_must_be_milliseconds_from_0_to_1000(settings, value):
    from notifications.checks import check_pipeline

    settings.NOTIFICATIONS_RECORD_GROUP_MS = value
    assert "notifications.E029" in {e.id for e in check_pipeline(None)}
