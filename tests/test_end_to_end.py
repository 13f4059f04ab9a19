"""The whole flow with real processes: notify() in a transaction, the relay, a real
Celery worker, a real SMTP server."""

from __future__ import annotations

import hashlib

import pytest
from django.db import transaction

from notifications import notify
from notifications.models import Notification, OutboxMessage, SentEmail
from tests.conftest import notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_committed_notify_is_delivered_once_with_both_headers(smtp_server, module_worker):
    kwargs = notification_kwargs(to="Ann Example <ann@example.com>", html_body="<p>Hello Ann</p>")
    n = notify(**kwargs)
    key = f"tests:{kwargs['notification_id']}:42"
    assert n.key == key and n.status == "created"

    [received] = smtp_server.wait_received(key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert received.message_id == f"<{digest}@notifications.local>"
    assert received.message["X-Notification-Key"] == key
    assert received.to == ["ann@example.com"]
    assert received.message["Subject"] == "Your invoice"
    assert received.message.get_body(("plain",)).get_content().strip() == "Hello Ann"
    assert received.message.get_body(("html",)).get_content().strip() == "<p>Hello Ann</p>"

    n = wait_for(lambda: Notification.objects.filter(key=key, status="sent").first(), what="status sent")
    assert n.attempts == 1 and n.sent_at is not None and n.published_at is not None
    assert n.created_at <= n.published_at <= n.sent_at
    assert SentEmail.objects.get(key=key).state == "sent"
    assert OutboxMessage.objects.get(notification=n).published_at is not None


def test_rolled_back_notify_is_never_sent(smtp_server, module_worker):
    rolled_back = notification_kwargs()
    with pytest.raises(RuntimeError), transaction.atomic():
        notify(**rolled_back)
        raise RuntimeError("caller's transaction fails")
    assert not Notification.objects.filter(notification_id=rolled_back["notification_id"]).exists()
    assert not OutboxMessage.objects.exists()

    # A later committed notification goes through the same relay and worker; by the time
    # it arrives, anything the rolled-back one had left behind would have been sent too.
    committed = notification_kwargs()
    notify(**committed)
    smtp_server.wait_received(f"tests:{committed['notification_id']}:42")
    assert smtp_server.count(f"tests:{rolled_back['notification_id']}:42") == 0


def test_repeated_key_gives_one_row_and_one_email(smtp_server, module_worker):
    kwargs = notification_kwargs()
    first = notify(**kwargs)
    again = notify(**kwargs)
    assert again.pk == first.pk and again.subject == "Your invoice"
    key = first.key
    smtp_server.wait_received(key)
    wait_for(lambda: Notification.objects.filter(key=key, status="sent").exists())
    third = notify(**kwargs)  # after delivery: still the same row, nothing queued
    assert third.pk == first.pk and third.status == "sent"
    assert Notification.objects.filter(key=key).count() == 1
    assert OutboxMessage.objects.filter(notification=first).count() == 1
    assert smtp_server.count(key) == 1
