"""The broker side: durable quorum topology with a dead-letter bound, and publishes that
fail loudly (confirm + mandatory) instead of losing a message."""

from __future__ import annotations

import pytest
from amqp.exceptions import ChannelError
from celery import current_app

from notifications import notify
from notifications.models import OutboxMessage
from notifications.relay import relay_batch
from tests.conftest import notification_kwargs

pytestmark = pytest.mark.django_db(transaction=True)


def declare_passive(name: str):
    with current_app.connection_for_write() as conn:
        return conn.default_channel.queue_declare(queue=name, passive=True)


@pytest.fixture
def no_wakeups(settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


def test_unroutable_publish_raises_and_leaves_the_row_unpublished(no_wakeups):
    first = notify(**notification_kwargs())
    assert relay_batch() == 1  # declares the queue on this connection (and caches that)
    with current_app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue="notifications.deliver")

    lost = notify(**notification_kwargs())
    with pytest.raises(ChannelError, match="NO_ROUTE"):
        relay_batch()
    assert OutboxMessage.objects.get(notification=lost).published_at is None
    assert OutboxMessage.objects.get(notification=first).published_at is not None

    # The failed connection was dropped; the next pass declares the queue again.
    assert relay_batch() == 1
    assert OutboxMessage.objects.get(notification=lost).published_at is not None
    assert declare_passive("notifications.deliver").message_count == 1


def test_delivery_queue_is_a_durable_quorum_queue_with_a_dead_letter_bound(no_wakeups):
    notify(**notification_kwargs())
    relay_batch()
    import json
    import subprocess

    from tests.settings import VHOST

    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            VHOST,
            "name",
            "type",
            "durable",
            "arguments",
            "--formatter",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    queues = {q["name"]: q for q in json.loads(out)}
    deliver = queues["notifications.deliver"]
    assert deliver["type"] == "quorum" and deliver["durable"] is True
    arguments = json.dumps(deliver["arguments"])
    assert '"x-delivery-limit"' in arguments and '"notifications.dead"' in arguments
    assert queues["notifications.dead"]["type"] == "quorum"
