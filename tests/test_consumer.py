"""The worker's consumer: native delayed delivery is set up through the failover
connection, so a broker URL that does not answer costs a refused connect, not the ten
seconds Celery's own step spends retrying it while the worker takes no message."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, current_app
from django.conf import settings
from kombu import Connection

from notifications import broker
from notifications.consumer import DelayedDelivery
from tests.settings import VHOST

pytestmark = pytest.mark.django_db  # the session's database teardown expects one


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_configure_makes_it_the_workers_consumer():
    assert current_app.conf.worker_consumer == "notifications.consumer:Consumer"
    custom = Celery("custom", set_as_current=False)
    custom.conf.worker_consumer = "myservice.consumer:Consumer"
    broker.configure(custom)
    assert custom.conf.worker_consumer == "myservice.consumer:Consumer"


def test_delayed_delivery_is_set_up_on_the_node_that_answers(broker_vhost, monkeypatch):
    live = settings.CELERY_BROKER_URL
    down = f"amqp://guest:guest@127.0.0.1:{closed_port()}/{VHOST}"
    monkeypatch.setenv("CELERY_BROKER_URL", f"{down};{live}")  # Celery reads it before any app setting
    app = Celery("cluster", set_as_current=False)
    broker.configure(app)
    assert app.conf.broker_url.startswith(down)
    with Connection(live) as conn:
        channel: Any = conn.default_channel
        for queue in app.amqp.queues.values():
            queue(channel).declare()  # as the worker's Tasks step does before
        channel.exchange_delete("celery_delayed_delivery")

    consumer = SimpleNamespace(app=app)
    started = time.monotonic()
    DelayedDelivery(consumer).start(consumer)
    assert time.monotonic() - started < 5.0  # Celery's own step: 9 s and more on the dead URL

    with Connection(live) as conn:
        channel = conn.default_channel
        channel.exchange_declare("celery_delayed_delivery", "topic", passive=True)
        assert channel.queue_declare("celery_delayed_0", passive=True).queue == "celery_delayed_0"
