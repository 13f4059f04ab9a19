"""Faults during delivery, one at a time, against real worker processes: the email still
reaches the mail server, and only once (or, in the ambiguous window, as the setting says)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from django.db.models import F

from notifications import notify
from notifications.managers import NOTIFICATION_COLUMNS
from notifications.models import Notification, SentEmail
from tests.conftest import delivery_outcomes, notification_kwargs, wait_for
from tests.smtp import Plan

pytestmark = pytest.mark.django_db(transaction=True)


def _status(key: str, status: str, timeout: float = 40.0) -> Notification:
    return wait_for(
        lambda: Notification.objects.filter(key=key, status=status).first(), timeout=timeout, what=f"{key} {status}"
    )


def test_sigkill_of_worker_mid_send_gives_exactly_one_email(smtp_server, workers):
    worker = workers.start()
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=False))
    smtp_server.wait_started(n.key)
    worker.kill()  # main process and pool children, while the server holds DATA
    release.set()  # the server never accepted that copy

    workers.start()
    sent = _status(n.key, "sent")
    assert smtp_server.count(n.key) == 1
    claim = SentEmail.objects.get(key=n.key)
    assert claim.state == "sent" and claim.token == 2  # taken over once, after the lease
    assert sent.ambiguous_count == 1  # the takeover could not know the first copy failed


def test_sigkill_of_pool_child_only_gives_exactly_one_email(smtp_server, workers):
    worker = workers.start(concurrency=2)
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=False))
    smtp_server.wait_started(n.key)
    owner = SentEmail.objects.get(key=n.key).owner
    child = int(owner.rsplit(":", 1)[1])
    assert child in worker.children()
    os.kill(child, signal.SIGKILL)  # task_reject_on_worker_lost requeues the message
    release.set()

    _status(n.key, "sent")
    assert smtp_server.count(n.key) == 1
    assert worker.proc.poll() is None


def test_crash_after_server_accepted_resends_with_same_message_id(smtp_server, workers):
    worker = workers.start()
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_started(n.key)
    smtp_server.wait_received(n.key, 1)  # the server has the first copy...
    worker.kill()  # ...and the worker dies before it hears so
    release.set()

    workers.start()  # default NOTIFICATIONS_AMBIGUOUS=resend: at-least-once
    sent = _status(n.key, "sent")
    copies = smtp_server.messages(n.key)
    assert len(copies) == 2
    assert copies[0].message_id == copies[1].message_id == n.message_id
    assert sent.ambiguous_count == 1  # the duplicate is counted, not silent


def test_crash_after_server_accepted_is_held_in_hold_mode(smtp_server, workers):
    worker = workers.start(NOTIFICATIONS_AMBIGUOUS="hold")
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_started(n.key)
    smtp_server.wait_received(n.key, 1)
    worker.kill()
    release.set()

    workers.start(NOTIFICATIONS_AMBIGUOUS="hold")
    held = _status(n.key, "ambiguous")
    assert held.ambiguous_count == 1 and "held" in held.last_error
    assert SentEmail.objects.get(key=n.key).state == "held"
    assert smtp_server.count(n.key) == 1


def test_redis_flush_mid_delivery_causes_no_second_email(smtp_server, workers, redis_client):
    from celery import current_app

    from notifications import broker
    from notifications.models import OutboxMessage

    workers.start(concurrency=2)
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_started(n.key)
    [pending] = OutboxMessage.objects.filter(notification=n).values_list("notification_id", flat=True)
    assert pending == n.pk
    redis_client.flushdb()  # the first worker's lock is gone
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    broker.publish_deliveries(current_app, [payload])  # a second copy of the message
    # The second copy finds no Redis lock, but the database claim is live: it must wait.
    wait_for(lambda: SentEmail.objects.filter(key=n.key).exists())
    release.set()

    _status(n.key, "sent")
    outcomes = wait_for(lambda: len(delivery_outcomes(n.key)) >= 2 and delivery_outcomes(n.key), timeout=30)
    assert outcomes == ["duplicate", "sent"]
    assert smtp_server.count(n.key) == 1


def test_4xx_then_success_gives_one_email(smtp_server, workers):
    workers.start()
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="451 4.3.0 Mailbox temporarily unavailable", times=1))
    notify(**kwargs)
    sent = _status(key, "sent")
    assert sent.attempts == 2 and sent.ambiguous_count == 0
    assert smtp_server.count(key) == 1


def test_5xx_fails_at_once_with_the_reply(smtp_server, workers):
    workers.start()
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="550 5.1.1 No such user here", times=-1))
    notify(**kwargs)
    failed = _status(key, "failed")
    assert failed.attempts == 1
    assert "550" in failed.last_error and "No such user here" in failed.last_error
    assert SentEmail.objects.get(key=key).state == "failed"
    assert smtp_server.count(key) == 0


def test_transient_errors_until_retries_run_out_end_failed(smtp_server, workers):
    workers.start()
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(reply="421 4.7.0 Try again later", times=-1))
    notify(**kwargs)
    failed = _status(key, "failed")
    assert failed.attempts == 4  # NOTIFICATIONS_MAX_ATTEMPTS in tests/settings.py
    assert "gave up after 4 attempts" in failed.last_error and "421" in failed.last_error
    assert smtp_server.count(key) == 0


def test_mail_server_down_then_up_delivers(smtp_server, workers, settings):
    """Connection refused is transient: nothing can have been delivered, so no ambiguity,
    and no attempt either (finding 8: an outage must not use up the attempts)."""
    worker = workers.start(EMAIL_PORT="1")  # nothing listens on port 1
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    notify(**kwargs)
    wait_for(
        lambda: Notification.objects.filter(key=key, status="retrying", last_error__contains="unreachable").exists()
    )
    assert Notification.objects.get(key=key).attempts == 0
    worker.stop()
    workers.start()
    sent = _status(key, "sent")
    assert sent.ambiguous_count == 0 and sent.attempts == 1
    assert smtp_server.count(key) == 1
    assert Notification.objects.filter(key=key, attempts=F("attempts")).count() == 1


@pytest.mark.parametrize("mode", ["resend", "hold"])
def test_reply_slower_than_the_client_timeout_is_ambiguous(smtp_server, workers, mode):
    """The server takes the message but answers after EMAIL_TIMEOUT (1.5 s in tests): the
    worker cannot know, so the case is counted, and the setting decides."""
    workers.start(NOTIFICATIONS_AMBIGUOUS=mode)
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    late = threading.Event()
    smtp_server.plan(key, Plan(hold=late, keep=True))
    notify(**kwargs)
    smtp_server.wait_received(key, 1)
    expected = "retrying" if mode == "resend" else "ambiguous"
    n = _status(key, expected, timeout=20)
    late.set()  # the reply the client gave up on
    assert n.ambiguous_count == 1 and "connection lost during the SMTP transaction" in n.last_error
    if mode == "resend":
        sent = _status(key, "sent")
        copies = smtp_server.messages(key)
        assert len(copies) == 2 and {c.message_id for c in copies} == {sent.message_id}
    else:
        assert SentEmail.objects.get(key=key).state == "held"
        assert smtp_server.count(key) == 1


def test_warm_shutdown_finishes_the_send_in_flight(smtp_server, workers):
    worker = workers.start()
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_received(n.key, 1)
    worker.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the task, then exit
    release.set()
    assert worker.proc.wait(timeout=30) == 0
    sent = _status(n.key, "sent")
    assert sent.ambiguous_count == 0 and smtp_server.count(n.key) == 1


def test_broker_connections_closed_mid_send_give_one_email(smtp_server, workers, broker_vhost):
    import subprocess

    workers.start()
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_received(n.key, 1)
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "--vhost", broker_vhost, "test: connections closed"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    release.set()  # the send completes and is recorded; the ack has no channel left
    _status(n.key, "sent")
    # The unacked message comes back to the reconnected worker and finds the key sent.
    wait_for(lambda: "duplicate" in delivery_outcomes(n.key), timeout=60, what="redelivery after the connection loss")
    assert smtp_server.count(n.key) == 1


def test_database_sessions_terminated_mid_send_still_record_the_result(smtp_server, workers):
    import psycopg
    from django.conf import settings as django_settings

    workers.start()
    n = notify(**notification_kwargs())
    release = threading.Event()
    smtp_server.plan(n.key, Plan(hold=release, keep=True))
    smtp_server.wait_received(n.key, 1)
    database = django_settings.DATABASES["default"]["NAME"]
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'notifications-test-child'",
            [database],
        ).fetchone()[0]
    assert killed >= 1  # the worker's session, at least
    release.set()  # the server's 250 arrives; the worker reconnects to record it
    sent = _status(n.key, "sent")
    assert sent.ambiguous_count == 0 and smtp_server.count(n.key) == 1


def test_redis_unreachable_only_loses_the_fast_path(smtp_server, workers):
    workers.start(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens there
    n = notify(**notification_kwargs())
    sent = _status(n.key, "sent")
    assert sent.attempts == 1 and smtp_server.count(n.key) == 1


def test_connection_dropped_before_the_reply_is_ambiguous_and_resent(smtp_server, workers):
    workers.start()
    kwargs = notification_kwargs()
    key = f"tests:{kwargs['notification_id']}:42"
    smtp_server.plan(key, Plan(drop=True))
    notify(**kwargs)
    sent = _status(key, "sent")
    assert sent.ambiguous_count == 1 and sent.attempts == 2
    assert smtp_server.count(key) == 1  # the dropped copy was never kept
