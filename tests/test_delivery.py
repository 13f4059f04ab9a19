"""Delivery details a user can see at the mail server."""

from __future__ import annotations

import pytest

from notifications import notify
from notifications.models import Notification
from tests.conftest import notification_kwargs, wait_for
from tests.smtp import Plan

pytestmark = pytest.mark.django_db(transaction=True)


def test_worker_reuses_one_smtp_connection_across_emails(smtp_server, workers):
    workers.start(concurrency=1, NOTIFICATIONS_SEND_CONCURRENCY="1")
    keys = [notify(**notification_kwargs()).key for _ in range(3)]
    copies = [smtp_server.wait_received(key)[0] for key in keys]
    assert all(c.peer is not None for c in copies)
    assert len({c.peer for c in copies}) == 1  # one connection, three messages


def test_a_failed_send_drops_the_connection_and_the_next_one_reconnects(smtp_server, workers):
    workers.start(concurrency=1, NOTIFICATIONS_SEND_CONCURRENCY="1")
    first = notify(**notification_kwargs())
    [before] = smtp_server.wait_received(first.key)
    bounced = notification_kwargs()
    key = f"tests:{bounced['notification_id']}:42"
    smtp_server.plan(key, Plan(drop=True))  # the server hangs up mid-transaction
    notify(**bounced)
    wait_for(lambda: Notification.objects.filter(key=key, status="sent").exists(), timeout=30)
    [after] = smtp_server.messages(key)
    assert after.peer != before.peer  # a new connection after the dropped one
