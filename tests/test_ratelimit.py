"""A backend's rate limit holds at the mail server across worker processes, with or
without Redis; waiting for it is no attempt, and a wait cut short by the time budget
releases the email, which is delivered later exactly once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from notifications import metrics, notify_many
from notifications.chaos.netcut import LineCut
from notifications.delivery import deliver_many, requeue_through_outbox
from notifications.models import Notification, RateBucket, SentEmail
from notifications.ratelimit import acquire
from notifications.relay import relay_batch
from project.bench.ratelimit import figures, max_in_window
from tests.conftest import notification_kwargs, take_delivery_payloads, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

RATE = 50.0
WINDOW_MAX = 55  # RATE x 1.1
# Slots are spaced for 95% of the limit (ratelimit.HEADROOM): about 47.5/s when nothing else
# runs. The floor only shows the limit does not starve the sends; a loaded 2-core machine
# has measured 44.9/s, so it sits at 80% of the limit rather than at the nominal figure.
AVERAGE_MIN = 40.0


def bulk(port: int, rate: float = RATE) -> dict[str, Any]:
    return {
        "bulk": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": port, "timeout": 1.5},
            "RATE_LIMIT": rate,
        }
    }


def _queue(count: int, tag: str) -> list[str]:
    items = [notification_kwargs(notification_id=f"{tag}-{i}", user_id=str(i), backend="bulk") for i in range(count)]
    return [n.key for n in notify_many(items)]


def _arrivals(smtp_server: Any, keys: list[str], timeout: float) -> list[float]:
    wanted = set(keys)
    wait_for(
        lambda: len({r.key for r in smtp_server.all_messages()} & wanted) == len(wanted),
        timeout=timeout,
        interval=0.2,
        what=lambda: f"{len({r.key for r in smtp_server.all_messages()} & wanted)} of {len(wanted)} emails",
    )
    arrived = [r for r in smtp_server.all_messages() if r.key in wanted]
    assert len(arrived) == len(wanted), "an email arrived twice"
    return [r.at for r in arrived]


def _start_three(workers: Any, backends: dict[str, Any], **env: str) -> None:
    for _ in range(3):
        workers.start(concurrency=1, NOTIFICATIONS_BACKENDS=json.dumps(backends), **env)


def test_fifty_a_second_over_three_workers_holds_at_the_mail_server(settings, smtp_server, workers):
    backends = bulk(smtp_server.port)
    settings.NOTIFICATIONS_BACKENDS = backends
    _start_three(workers, backends)
    keys = _queue(600, "rate")
    seen = figures(_arrivals(smtp_server, keys, timeout=90))
    print(f"\n50/s over three worker processes, 600 emails: {seen}")
    assert seen["max_in_window"] <= WINDOW_MAX, seen
    assert seen["average_per_second"] >= AVERAGE_MIN, seen
    # Waiting for the limit is no attempt: one each, though batches ran out of time waiting.
    rows = Notification.objects.filter(key__in=keys)
    assert set(rows.values_list("status", flat=True)) == {"sent"}
    assert set(rows.values_list("attempts", flat=True)) == {1}


def test_losing_redis_mid_run_does_not_raise_the_rate(settings, smtp_server, workers, redis_client):
    """The workers reach Redis through a relay that is closed mid-run (their connections
    reset, new ones refused), as if Redis stopped; other tests' Redis stays up."""
    backends = bulk(smtp_server.port)
    settings.NOTIFICATIONS_BACKENDS = backends
    line = LineCut(port=6379).start()
    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    try:
        _start_three(workers, backends, REDIS_URL=f"redis://127.0.0.1:{line.port}/{db}")
        keys = _queue(400, "redis")
        wanted = set(keys)
        wait_for(lambda: len({r.key for r in smtp_server.all_messages()} & wanted) >= 150, timeout=60)
        line.stop()
        stopped_at = max(r.at for r in smtp_server.all_messages() if r.key in wanted)
        times = _arrivals(smtp_server, keys, timeout=90)
    finally:
        line.stop()
    after = [t for t in times if t > stopped_at]
    seen, seen_after = figures(times), figures(after)
    print(f"\n50/s, Redis gone after 150 of 400: whole run {seen}; after the loss {seen_after}")
    assert len(after) >= 100
    assert seen["max_in_window"] <= WINDOW_MAX, seen
    assert seen_after["max_in_window"] <= WINDOW_MAX, seen_after
    assert set(Notification.objects.filter(key__in=keys).values_list("attempts", flat=True)) == {1}


def _payloads() -> list[dict[str, Any]]:
    """Relay the due outbox rows and take the delivery messages (no worker runs)."""
    if not relay_batch():
        return []
    return [p for message in take_delivery_payloads(wait=5) for p in message]


def test_a_wait_cut_short_by_the_budget_releases_the_email_untried(settings, smtp_server):
    """In-process: one sending lane, five emails a second, a budget of one second. The lane
    waits for each slot; the emails whose slot would come after the budget are released
    with no attempt, go back through the outbox (as the task does) and are delivered
    once when they come round again."""
    settings.NOTIFICATIONS_BACKENDS = bulk(smtp_server.port, rate=5.0)
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False  # no worker runs: the test relays
    settings.NOTIFICATIONS_SEND_CONCURRENCY = 1
    take_delivery_payloads()
    keys = _queue(7, "budget")
    payloads = sorted(_payloads(), key=lambda p: int(p["user_id"]))
    waits = metrics.RATE_LIMIT_WAITS.labels("bulk")
    waited_before = waits._value.get()

    outcomes = deliver_many(payloads, budget=1.0)

    statuses = [o.status for o in outcomes]
    sent = statuses.count("sent")
    assert statuses == ["sent"] * sent + ["retry"] * (7 - sent) and 3 <= sent <= 6, outcomes
    assert waits._value.get() - waited_before >= 0.2 * (sent - 1) * 0.8  # it waited for each slot
    arrived = sorted(smtp_server.messages(k)[0].at for k in keys[:sent])
    assert min(b - a for a, b in zip(arrived, arrived[1:], strict=False)) >= 0.15
    # The first without a slot says why; the rest of the batch goes back with it.
    released = [o for o in outcomes if o.status == "retry"]
    assert released[0].reason == "rate_limited" and 0 < released[0].retry_in <= 1
    assert "rate limit" in Notification.objects.get(key=released[0].key).last_error
    assert {o.reason for o in released[1:]} <= {"not_attempted"} and {o.attempts for o in released} == {0}
    for outcome in released:
        assert smtp_server.count(outcome.key) == 0
        claim = SentEmail.objects.get(key=outcome.key)
        assert claim.state == "released" and claim.send_started_at is None
        row = Notification.objects.get(key=outcome.key)
        assert row.attempts == 0 and row.last_error.startswith("not attempted"), row.last_error

    # Back through the outbox, as the task puts them, and delivered once each.
    requeue_through_outbox([p for p, o in zip(payloads, outcomes, strict=True) if o.status == "retry"])
    again = wait_for(_payloads, timeout=10, what="the released emails' outbox rows due again")
    assert {p["key"] for p in again} == {o.key for o in released}
    assert [o.status for o in deliver_many(again, budget=10)] == ["sent"] * len(again)
    for key in keys:
        smtp_server.wait_received(key)
        assert smtp_server.count(key) == 1
    assert set(Notification.objects.filter(key__in=keys).values_list("attempts", flat=True)) == {1}


def test_slots_are_one_interval_apart_whoever_takes_them():
    """The bucket itself: at 10/s each grant is 0.1 s after the one before, a grant past
    ``within`` is refused with the wait until it would be granted, and the row is created
    on first use."""
    db = "default"
    assert not RateBucket.objects.filter(name="slots").exists()
    grants = [acquire("slots", 10.0, 0.35, db) for _ in range(5)]
    assert RateBucket.objects.filter(name="slots").exists()
    assert [g.granted for g in grants] == [True, True, True, True, False]
    waits = [g.wait for g in grants]
    assert waits[0] < 0.02
    for earlier, later in zip(waits[:3], waits[1:4], strict=True):
        assert later - earlier == pytest.approx(0.1, abs=0.02)
    # Refused: slots are taken up to 0.4 s ahead, so the next comes within 0.35 s in about 0.05 s.
    assert 0 < waits[4] <= 0.1


def test_max_in_window_counts_a_sliding_second():
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert max_in_window([i / 64 for i in range(200)]) == 64  # exact in binary: no rounding at the edge
    assert max_in_window([]) == 0
