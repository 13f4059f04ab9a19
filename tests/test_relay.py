"""The relay: each committed row is published once, even with several relays at once,
and a relay that dies at either crash point loses nothing."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from celery import current_app

from notifications import notify, relay
from notifications.models import Notification, OutboxMessage
from tests.conftest import ROOT, child_env, delivery_outcomes, notification_kwargs, take_delivery_payloads, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def run_relay(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "relay"],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def drain_deliver_queue(prefix: str, expected: int, timeout: float = 20.0) -> Counter[str]:
    """Consume the delivery queue directly (no worker runs) and count keys under ``prefix``."""
    seen: Counter[str] = Counter()

    def step() -> bool:
        for keys in take_deliveries():
            seen.update(k for k in keys if k.startswith(prefix))
        return sum(seen.values()) >= expected

    wait_for(step, timeout=timeout, interval=0, what="queue drained")
    return seen


@pytest.fixture
def no_wakeups(settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


def test_two_relays_at_once_publish_each_row_once(no_wakeups):
    service = f"relay{notification_kwargs()['notification_id'][-6:]}"
    for i in range(300):
        notify(**notification_kwargs(service=service, notification_id=str(i)))
    relays = [
        subprocess.Popen(
            [sys.executable, "manage.py", "relay"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    counts = [int(p.communicate(timeout=120)[0].split()[-1]) for p in relays]
    assert all(p.returncode == 0 for p in relays)
    assert sum(counts) >= 300 and not OutboxMessage.objects.filter(published_at__isnull=True).exists()
    seen = drain_deliver_queue(f"{service}:", expected=300)
    assert len(seen) == 300 and set(seen.values()) == {1}
    assert Notification.objects.filter(service=service, status="published").count() == 300


def test_relay_killed_after_claim_publishes_nothing_then_everything(no_wakeups):
    kwargs = notification_kwargs()
    n = notify(**kwargs)
    died = run_relay(NOTIFICATIONS_CRASH_POINTS=f"relay_after_claim={n.key}")
    assert died.returncode == -9
    assert OutboxMessage.objects.get(notification=n).published_at is None  # rolled back
    assert run_relay().returncode == 0
    assert drain_deliver_queue(n.key, expected=1) == {n.key: 1}


def test_relay_killed_after_confirm_publishes_again_and_one_email_goes_out(no_wakeups, smtp_server, workers):
    n = notify(**notification_kwargs())
    died = run_relay(NOTIFICATIONS_CRASH_POINTS=f"relay_after_confirm={n.key}")
    assert died.returncode == -9
    assert OutboxMessage.objects.get(notification=n).published_at is None  # confirmed but not marked
    assert run_relay().returncode == 0  # publishes the same row a second time
    workers.start()
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").exists(), timeout=30)

    def both_settled() -> list[str] | None:
        # A copy that met the other's lock went back to the outbox, due a moment later:
        # this test's relay is run by hand.
        relay.drain()
        outcomes = delivery_outcomes(n.key)
        return outcomes if len(outcomes) == 2 else None

    assert wait_for(both_settled, timeout=30, interval=0.5) == ["duplicate", "sent"]
    assert smtp_server.count(n.key) == 1


def test_relay_with_broker_down_leaves_rows_for_later(no_wakeups):
    n = notify(**notification_kwargs())
    down = run_relay(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    assert down.returncode != 0
    assert OutboxMessage.objects.get(notification=n).published_at is None
    assert Notification.objects.get(pk=n.pk).status == "created"
    assert run_relay().returncode == 0
    assert drain_deliver_queue(n.key, expected=1) == {n.key: 1}
    assert Notification.objects.get(pk=n.pk).status == "published"


def test_a_hung_redis_does_not_hold_up_notify(settings):
    """The commit's wake-up is sent from a background thread: with a Redis that accepts
    connections and never answers, notify() returns (its row committed) while the
    wake-up is still waiting, and the wake-up gives up on its own."""
    import socket

    from notifications import relay

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    settings.NOTIFICATIONS_REDIS_URL = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    try:
        n = notify(**notification_kwargs())
        assert not relay._waker.flush(timeout=0)  # returned before the wake-up was through
        assert OutboxMessage.objects.filter(notification=n, published_at__isnull=True).exists()
        assert relay._waker.flush(timeout=10)  # the wake-up timed out, logged, and ended
    finally:
        silent.close()


def test_a_forked_process_sends_its_own_wake_ups(redis_client):
    """A process forked after its parent woke the relay (a preloading server's workers)
    starts its own wake-up thread: the parent's does not exist in the child."""
    import multiprocessing

    from notifications import relay
    from notifications.conf import settings as conf

    flag = f"{conf.REDIS_KEY_PREFIX}{relay.key(relay.WAKE_FLAG)}"
    relay.wake_relay_soon()
    assert relay._waker.flush(timeout=10)
    redis_client.delete(flag)

    def child() -> None:
        relay.wake_relay_soon()
        raise SystemExit(0 if relay._waker.flush(timeout=10) else 1)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert redis_client.exists(flag)  # the child's wake-up reached Redis


def take_deliveries(wait: float = 0.5, limit: int = 0) -> list[list[str]]:
    """Consume the delivery messages waiting in the queue (no worker runs; all of them,
    or the first ``limit``): the keys each one carried."""
    return [[payload["key"] for payload in payloads] for payloads in take_delivery_payloads(wait, limit)]


def empty_delivery_queues() -> None:
    """Declare the delivery queues and take what earlier tests left in them."""
    from notifications import broker

    with current_app.connection_for_write() as conn:
        for queue in broker.queues():
            queue(conn.default_channel).declare()
    take_deliveries()


@pytest.fixture
def relay_loop(settings):
    """Beat's relay loop in this process, woken by commits only (no periodic pass)."""
    from notifications import locks, relay

    settings.NOTIFICATIONS_RELAY_INTERVAL = 30.0
    empty_delivery_queues()
    loop = relay.start_loop()
    wait_for(relay.loop_alive, what="the loop's heartbeat")
    yield loop
    loop.stop.set()
    locks.push(relay.key(relay.WAKE_LIST))  # out of its 30 s wait for a wake-up
    loop.join(timeout=40)
    assert not loop.is_alive()
    assert not relay.loop_alive()  # a stopped loop takes its heartbeat with it
    take_deliveries()


def published(n: Notification) -> bool:
    return OutboxMessage.objects.filter(notification=n, published_at__isnull=False).exists()


def test_rows_wait_while_deliveries_queue_for_a_worker_then_go_out_in_one_message(settings, relay_loop):
    """While a delivery message waits for a free worker, new rows would only queue behind
    it: the relay holds them, and when the queue has room they leave in one message
    instead of one message per wake-up."""
    import time

    settings.NOTIFICATIONS_RELAY_HOLD_MAX = 30.0
    first = notify(**notification_kwargs())
    wait_for(lambda: published(first), what="the first row published at once (nothing queued)")
    held = []
    for _ in range(5):
        held.append(notify(**notification_kwargs()))
        time.sleep(0.1)  # five wake-ups, each longer apart than the 20 ms linger
    time.sleep(0.5)
    assert not any(published(n) for n in held)  # the first one's message is still waiting
    assert take_deliveries(limit=1) == [[first.key]]
    wait_for(lambda: all(published(n) for n in held), what="the held rows published once the queue is empty")
    assert take_deliveries() == [[n.key for n in held]]


def test_rows_are_held_no_longer_than_the_hold_limit(settings, relay_loop):
    import time

    from notifications import broker

    settings.NOTIFICATIONS_RELAY_HOLD_MAX = 1.0
    first = notify(**notification_kwargs())
    wait_for(lambda: published(first), what="the first row published at once")
    began = time.monotonic()
    second = notify(**notification_kwargs())
    wait_for(lambda: published(second), timeout=10, what="the second row published after the hold")
    assert time.monotonic() - began >= 1.0
    assert broker.deliveries_waiting(current_app) == 2  # published though the queue never emptied


def test_commits_close_together_share_one_wake_up(monkeypatch):
    """One wake-up per WAKE_GAP at most from a process: a Redis round trip per commit
    would cost a busy caller more CPU than its insert."""
    import itertools
    import time

    from notifications import relay

    sent: list[float] = []
    real = relay.wake_relay

    def counted() -> None:
        sent.append(time.monotonic())
        real()

    monkeypatch.setattr(relay, "wake_relay", counted)
    began = time.monotonic()
    for _ in range(50):
        relay.wake_relay_soon()  # what each notify() commit does
        time.sleep(0.001)
    assert relay._waker.flush(timeout=10)
    elapsed = time.monotonic() - began
    assert 1 <= len(sent) <= elapsed / relay.WAKE_GAP + 1
    assert all(b - a >= relay.WAKE_GAP for a, b in itertools.pairwise(sent))


def test_beats_relay_task_leaves_its_pass_to_a_live_relay_loop(no_wakeups):
    """The loop makes the periodic passes itself while it shows its heartbeat, so the
    task beat schedules does not take a pool slot from deliveries; without a heartbeat
    the task publishes."""
    from notifications import locks, relay, tasks

    n = notify(**notification_kwargs())
    locks.heartbeat(relay.key(relay.LOOP_ALIVE), 30)
    try:
        assert tasks.relay_outbox() == 0
        assert not published(n)
    finally:
        locks.clear(relay.key(relay.LOOP_ALIVE))
    assert tasks.relay_outbox() >= 1
    assert published(n)
    assert [n.key] in take_deliveries()


@pytest.fixture
def empty_queue(no_wakeups):
    empty_delivery_queues()


def test_messages_are_split_by_size_as_well_as_count(settings, empty_queue):
    """Finding 3: a message carried up to 50 notifications whatever their size. Bodies of
    40,000 non-ASCII characters are about 240 KB of JSON each: a 1 MB message takes 4."""
    from notifications.relay import relay_batch

    settings.NOTIFICATIONS_MAX_MESSAGE_BYTES = 1_000_000
    created = [notify(**notification_kwargs(body="é" * 40_000)) for _ in range(10)]
    assert relay_batch() == 10
    messages = take_deliveries()
    assert sorted(k for m in messages for k in m) == sorted(n.key for n in created)
    assert [len(m) for m in messages] == [4, 4, 2]


def test_a_notification_too_large_for_a_message_fails_and_the_rows_behind_it_flow(settings, empty_queue):
    """Finding 3: one notification the broker cannot take made every relay pass roll back
    and take the same oldest rows again. It ends failed with the reason; the others go."""
    from notifications.relay import relay_batch

    big = notify(**notification_kwargs(body="\x01" * 200_000))  # 1.2 MB as escaped JSON
    small = [notify(**notification_kwargs()) for _ in range(3)]
    settings.NOTIFICATIONS_MAX_MESSAGE_BYTES = 1_000_000
    assert relay_batch() == 4
    assert [k for m in take_deliveries() for k in m] == [n.key for n in small]
    failed = Notification.objects.get(pk=big.pk)
    assert failed.status == "failed" and "NOTIFICATIONS_MAX_MESSAGE_BYTES" in failed.last_error
    assert not OutboxMessage.objects.filter(published_at__isnull=True).exists()


def _rabbit_max_message_size(size: int) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "eval", f"application:set_env(rabbit, max_message_size, {size})."],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_a_notification_the_broker_refuses_fails_and_the_rows_behind_it_flow(empty_queue):
    """Finding 3, with the broker's own limit below ours (RabbitMQ 4 refuses messages over
    16 MiB by default): the broker closes the channel without saying which message; each
    goes again on its own, and only the refused one ends failed."""
    from notifications.relay import relay_batch

    before = [notify(**notification_kwargs()) for _ in range(2)]
    big = notify(**notification_kwargs(body="x" * 300_000))
    after = [notify(**notification_kwargs()) for _ in range(2)]
    _rabbit_max_message_size(200_000)
    try:
        assert relay_batch() == 5
    finally:
        _rabbit_max_message_size(134_217_728)  # RabbitMQ 3.x's default
    delivered = sorted(k for m in take_deliveries() for k in m)
    assert delivered == sorted(n.key for n in before + after)
    failed = Notification.objects.get(pk=big.pk)
    assert failed.status == "failed" and "the broker refused" in failed.last_error


def test_a_relay_loop_whose_passes_fail_shows_no_heartbeat(settings, caplog):
    """Finding 14: the loop refreshed its heartbeat even when every pass failed, so the
    workers' relay task never took over from a loop that could not reach its database."""
    import logging

    from django.db import connections

    from notifications import relay

    connections.settings["unreachable"] = {**connections.settings["default"], "PORT": "1"}
    settings.NOTIFICATIONS_RELAY_DATABASES = ["unreachable"]
    caplog.set_level(logging.WARNING, logger="notifications.relay")
    loop = relay.start_loop()
    try:
        wait_for(lambda: "relay pass failed" in caplog.text, what="a failed pass")
        wait_for(lambda: caplog.text.count("relay pass failed") >= 2, what="a second failed pass")
        assert not relay.loop_alive()
    finally:
        loop.stop.set()  # type: ignore[attr-defined]
        loop.join(timeout=20)
        connections["unreachable"].close()
        del connections.settings["unreachable"]
    assert not loop.is_alive()


def _fresh_broker_pools() -> None:
    """Drop this process's pooled broker connections (and what kombu remembers having
    declared on them), as a new process would start; the next use opens new ones."""
    from kombu import pools

    pools.reset()
    current_app._pool = None
    current_app.amqp._producer_pool = None


def test_a_queue_declared_with_other_arguments_fails_no_notification(settings, empty_queue):
    """Review: any PRECONDITION_FAILED counted as "the broker cannot carry this one", so a
    process whose NOTIFICATIONS_DELIVERY_LIMIT differs from the queue's (a caller that
    declares the shared queue from its own settings) failed every notification. Only a
    size refusal fails one; anything else leaves the rows for the next pass."""
    from notifications.relay import relay_batch

    n = notify(**notification_kwargs())
    settings.NOTIFICATIONS_DELIVERY_LIMIT = settings.NOTIFICATIONS_DELIVERY_LIMIT + 1
    _fresh_broker_pools()  # a new process: its connection declares the queue anew
    with pytest.raises(Exception, match="inequivalent arg"):
        relay_batch()
    assert Notification.objects.get(pk=n.pk).status == "created"
    assert OutboxMessage.objects.filter(notification=n, published_at__isnull=True).exists()


def test_one_database_away_does_not_stop_the_relay_of_the_others(settings, empty_queue):
    """Review: the first database that failed stopped the whole pass, in the same order
    every time, so the databases after it were never relayed during its outage."""
    from django.db import connections

    from notifications.relay import drain

    n = notify(**notification_kwargs())
    connections.settings["unreachable"] = {**connections.settings["default"], "PORT": "1"}
    settings.NOTIFICATIONS_RELAY_DATABASES = ["unreachable", "default"]
    try:
        with pytest.raises(Exception, match="connection"):
            drain()
    finally:
        connections["unreachable"].close()
        del connections.settings["unreachable"]
    assert take_deliveries() == [[n.key]]


def test_a_row_due_later_waits_until_it_is_due(empty_queue):
    """Retries that go through the outbox keep their backoff (``due_at``)."""
    from django.utils import timezone

    from notifications.delivery import requeue_through_outbox
    from notifications.managers import NOTIFICATION_COLUMNS
    from notifications.relay import relay_batch

    n = notify(**notification_kwargs())
    assert relay_batch() == 1 and take_deliveries() == [[n.key]]
    assert requeue_through_outbox([{c: getattr(n, c) for c in NOTIFICATION_COLUMNS}], due_in=60) == 1
    assert relay_batch() == 0
    OutboxMessage.objects.filter(notification=n, published_at__isnull=True).update(due_at=timezone.now())
    assert relay_batch() == 1 and take_deliveries() == [[n.key]]


def test_the_confirm_wait_grows_with_what_a_pass_carries():
    """Review: a pass of large notifications on a slow broker timed out at 10 s every
    time, was published again and again, and held back the rows behind it."""
    from notifications import broker

    queue = broker.queues()[1]
    small = [(queue, [{"key": "k", "body": "x" * 100}])]
    large = [(queue, [{"key": f"k{i}", "body": "x" * 1_000_000} for i in range(4)]) for _ in range(10)]
    assert broker._confirm_timeout(small) < broker.CONFIRM_TIMEOUT + 1
    assert broker._confirm_timeout(large) > broker.CONFIRM_TIMEOUT + 40
