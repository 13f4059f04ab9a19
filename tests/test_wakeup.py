"""How commits reach the relay loop (``NOTIFICATIONS_RELAY_WAKEUP``): each mode gets a
notification published without the periodic pass; under "listen" the commit itself is
the wake-up (a rollback or a repeat wakes nobody, Redis plays no part, a lost LISTEN
connection comes back)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction

from notifications import notify, relay, wakeup
from notifications.models import Notification, OutboxMessage
from tests.conftest import notification_kwargs, wait_for
from tests.conftest import test_database_url as database_url
from tests.test_relay import empty_delivery_queues, take_deliveries

pytestmark = pytest.mark.django_db(transaction=True)


def published(n: Notification) -> bool:
    return OutboxMessage.objects.filter(notification=n, published_at__isnull=False).exists()


@pytest.fixture
def loop_in(settings: Any) -> Iterator[Any]:
    """Start beat's relay loop in this process under a given wake-up mode, with no
    periodic pass to speak of (30 s), so only wake-ups explain a prompt publish."""
    from notifications import locks

    started: list[Any] = []

    def start(mode: str) -> Any:
        settings.NOTIFICATIONS_RELAY_WAKEUP = mode
        settings.NOTIFICATIONS_RELAY_INTERVAL = 30.0
        empty_delivery_queues()
        loop = relay.start_loop()
        started.append(loop)
        wait_for(relay.loop_alive, what="the loop's heartbeat")
        return loop

    yield start
    for loop in started:
        loop.stop.set()
        locks.push(relay.key(relay.WAKE_LIST))
        wakeup.notify("default")
        loop.join(timeout=40)
        assert not loop.is_alive()
    take_deliveries()


@pytest.mark.parametrize("mode", ["listen", "redis", "poll"])
def test_each_mode_publishes_a_commit_without_the_periodic_pass(loop_in, mode):
    loop_in(mode)
    time.sleep(0.3)  # past the loop's first pass: what follows needs a wake-up (or a poll)
    began = time.monotonic()
    n = notify(**notification_kwargs())
    wait_for(lambda: published(n), timeout=5, what=f"published under {mode!r}")
    assert time.monotonic() - began < 5  # the periodic pass would take 30 s
    assert take_deliveries() == [[n.key]]


@pytest.fixture
def listening() -> Iterator[psycopg.Connection[Any]]:
    """A LISTEN connection of the test's own on the relay's channel."""
    with psycopg.connect(database_url(), autocommit=True) as conn:
        conn.execute(f"LISTEN {wakeup.channel()}")
        yield conn


def heard(conn: psycopg.Connection[Any], within: float = 0.5) -> int:
    return sum(1 for _ in conn.notifies(timeout=within))


def test_under_listen_the_commit_is_the_wake_up(settings, listening):
    settings.NOTIFICATIONS_RELAY_WAKEUP = "listen"
    asked = relay._waker.asked
    with transaction.atomic():
        first = notify(**notification_kwargs())
        second = notify(**notification_kwargs())
        assert heard(listening) == 0  # not before the commit
    assert heard(listening) == 1  # the transaction's wake-ups fold into one
    with transaction.atomic():
        notify(**notification_kwargs())
        transaction.set_rollback(True)
    assert heard(listening) == 0  # rolled back: no email, nobody woken
    notify(**notification_kwargs(notification_id=first.notification_id))  # a repeat creates nothing
    assert heard(listening) == 0
    third = notify(**notification_kwargs())  # autocommit: the statement's own commit
    assert heard(listening) == 1
    assert relay._waker.asked == asked  # no wake-up thread, no Redis round trip in the caller
    assert {second.key, third.key} <= set(Notification.objects.values_list("key", flat=True))


def test_under_listen_notify_many_wakes_once(settings, listening):
    settings.NOTIFICATIONS_RELAY_WAKEUP = "listen"
    from notifications import notify_many

    notify_many([notification_kwargs() for _ in range(30)])
    assert heard(listening) == 1


def test_under_listen_manual_transactions_wake_on_commit(settings, listening):
    """Django has no on-commit hook under set_autocommit(False); the database's NOTIFY
    still goes out with the commit."""
    settings.NOTIFICATIONS_RELAY_WAKEUP = "listen"
    transaction.set_autocommit(False)
    try:
        notify(**notification_kwargs())
        assert heard(listening) == 0
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    assert heard(listening) == 1


def test_redis_mode_inserts_without_notify(settings, listening):
    settings.NOTIFICATIONS_RELAY_WAKEUP = "redis"
    notify(**notification_kwargs())
    assert heard(listening) == 0
    assert relay._waker.flush(timeout=5)


def test_under_listen_the_loop_needs_no_redis(settings, loop_in):
    loop_in("listen")
    time.sleep(0.3)
    settings.NOTIFICATIONS_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    n = notify(**notification_kwargs())
    wait_for(lambda: published(n), timeout=5, what="published with Redis unreachable")
    settings.NOTIFICATIONS_REDIS_URL = "redis://127.0.0.1:6379/0"


def test_a_lost_listen_connection_comes_back(loop_in):
    loop_in("listen")
    time.sleep(0.3)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN notifications_%%' "
            "AND pid <> pg_backend_pid()"
        )
        assert cursor.fetchone()[0] >= 1
    time.sleep(0.5)  # the loop notices, reconnects and passes
    wait_for(
        lambda: _listeners() >= 1,
        timeout=5,
        what="the loop listening again",
    )
    n = notify(**notification_kwargs())
    wait_for(lambda: published(n), timeout=5, what="published after the LISTEN connection was cut")


def _listeners() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN notifications_%%'")
        return int(cursor.fetchone()[0])


def test_an_unknown_mode_is_a_system_check_error(settings):
    from notifications.checks import check_pipeline

    settings.NOTIFICATIONS_RELAY_WAKEUP = "carrier-pigeon"
    assert "notifications.E028" in {e.id for e in check_pipeline(None)}
