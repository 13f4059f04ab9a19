"""What a mail-server failure means for the email, by how far the SMTP transaction got:
a server that cannot be reached or refuses the login costs no attempt and fails nothing
for good; a failure before anything was handed over is never ambiguous; the task's time
limit stops its sending threads instead of cutting a send short."""

from __future__ import annotations

import socket
import threading

import pytest
from celery import current_app

from notifications import broker, notify, notify_many
from notifications.chaos.mailserver import RecordingHandler
from notifications.managers import NOTIFICATION_COLUMNS
from notifications.models import Notification, SentEmail
from tests.conftest import notification_kwargs, wait_for
from tests.settings import _free_port
from tests.smtp import Plan

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),
]


def _status(key: str, status: str, timeout: float = 30.0, **extra: object) -> Notification:
    return wait_for(
        lambda: Notification.objects.filter(key=key, status=status, **extra).first(),
        timeout=timeout,
        what=lambda: list(Notification.objects.filter(key=key).values_list("status", "attempts", "last_error")),
    )


@pytest.fixture
def login_server():
    """A second SMTP server that wants a login: user ``notifications``, password ``right``."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        ok = auth_data.login == b"notifications" and auth_data.password == b"right"
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535

    handler = RecordingHandler()
    port = _free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        auth_required=True,
        auth_require_tls=False,
        auth_exclude_mechanism=["LOGIN"],  # smtplib would try LOGIN after PLAIN fails
        authenticator=authenticator,
    )
    controller.start()
    yield port, handler
    controller.stop()


def test_a_wrong_password_costs_no_attempt_and_fails_nothing(workers, login_server):
    """Finding 8: a 5xx at AUTH failed every email for good. It says nothing about the
    email: the notification waits, without using its attempts, until the login works."""
    port, handler = login_server
    env = {"EMAIL_PORT": str(port), "EMAIL_HOST_USER": "notifications"}
    wrong = workers.start(concurrency=1, EMAIL_HOST_PASSWORD="wrong", **env)
    n = notify(**notification_kwargs())
    waiting = _status(n.key, "retrying", last_error__contains="535")
    assert waiting.attempts == 0 and waiting.ambiguous_count == 0
    assert SentEmail.objects.get(key=n.key).state == "released"
    wrong.stop()
    workers.start(concurrency=1, EMAIL_HOST_PASSWORD="right", **env)
    sent = _status(n.key, "sent", timeout=60)
    assert sent.attempts == 1 and sent.ambiguous_count == 0
    assert [r.key for r in handler.received] == [n.key]


def test_a_server_that_refuses_the_connection_with_554_fails_nothing(workers):
    """Finding 8: a 5xx greeting ("554 go away") is about the server, not the email."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def refuse() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.sendall(b"554 5.7.1 no service for you\r\n")
            client.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        workers.start(concurrency=1, EMAIL_PORT=str(port))
        n = notify(**notification_kwargs())
        waiting = _status(n.key, "retrying", last_error__contains="554")
        assert waiting.attempts == 0 and "unreachable" in waiting.last_error
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_reused_connection_found_closed_is_neither_ambiguous_nor_an_attempt(smtp_server, workers):
    """Finding 10: the server hangs up after one email (an idle timeout, say); the next
    email finds the connection dead at MAIL FROM. Nothing of it was handed over: the
    worker connects again and sends it, once, with no ambiguity and one attempt."""
    base = notification_kwargs()["notification_id"]  # keys in send order (a batch goes in key order)
    rows = [notification_kwargs(notification_id=f"{base}-{i}", user_id=str(i)) for i in range(2)]
    first, second = [f"tests:{r['notification_id']}:{r['user_id']}" for r in rows]
    smtp_server.plan(first, Plan(hangup=True))
    notify_many(rows)
    workers.start(concurrency=1, NOTIFICATIONS_SEND_CONCURRENCY="1")
    sent = _status(second, "sent")
    assert sent.attempts == 1 and sent.ambiguous_count == 0
    assert smtp_server.count(second) == 1
    [a], [b] = smtp_server.messages(first), smtp_server.messages(second)
    assert a.peer != b.peer  # sent over a new connection


def test_an_email_that_cannot_be_built_fails_at_once_without_ambiguity(smtp_server, workers):
    """Finding 10: an error while building the message (here a header with a line break,
    in a message that did not come through notify()) was counted ambiguous and, in hold
    mode, parked for a person. Nothing reached the server: it fails, with the reason."""
    workers.start(concurrency=1, NOTIFICATIONS_AMBIGUOUS="hold")
    n = notify(**notification_kwargs())
    Notification.objects.filter(pk=n.pk).update(status="sent")  # this copy is not the one under test
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    payload.update(key=f"{n.key}-raw", notification_id=f"{n.notification_id}-raw", subject="Two\nlines")
    broker.publish_deliveries(current_app, [payload])
    failed = _status(payload["key"], "failed")
    assert "could not be built" in failed.last_error
    assert failed.ambiguous_count == 0 and failed.attempts == 1
    assert smtp_server.count(payload["key"]) == 0


def test_the_time_limit_stops_the_sending_threads_and_counts_nothing_ambiguous(smtp_server, workers):
    """Findings 10 and 11: the task's soft time limit fired while its only sending lane
    waited for the server's reply. That send was counted ambiguous (the exception cut
    it short), and sending threads went on after their task ended. Now the lane finishes
    the email it is sending and records it, releases the rest untried, and stops; the
    task's retry sends those."""
    base = notification_kwargs()["notification_id"]  # keys in send order (a batch goes in key order)
    rows = [notification_kwargs(notification_id=f"{base}-{i}", user_id=str(i)) for i in range(3)]
    keys = [f"tests:{r['notification_id']}:{r['user_id']}" for r in rows]
    release = threading.Event()
    smtp_server.plan(keys[0], Plan(hold=release, keep=True))
    workers.start(
        concurrency=1,
        NOTIFICATIONS_SEND_CONCURRENCY="1",
        EMAIL_TIMEOUT="20",
        NOTIFICATIONS_TASK_SOFT_TIME_LIMIT="3",
        NOTIFICATIONS_TASK_TIME_LIMIT="10",
    )
    notify_many(rows)
    smtp_server.wait_started(keys[0])
    timer = threading.Timer(4.5, release.set)  # the reply comes after the soft limit
    timer.start()
    try:
        for key in keys:
            sent = _status(key, "sent", timeout=40)
            assert sent.attempts == 1 and sent.ambiguous_count == 0
            assert smtp_server.count(key) == 1
    finally:
        timer.cancel()
        release.set()
    released = SentEmail.objects.filter(key__in=keys[1:]).values_list("response", flat=True)
    assert all(r.startswith("250") for r in released)
