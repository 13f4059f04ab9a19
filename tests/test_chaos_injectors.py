"""The chaos run's faults do what their report lines say: a run that believes it closed
the broker's connections when it did not proves nothing."""

from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace

import kombu
import pytest
from amqp.exceptions import ConnectionForced

from notifications.chaos import injectors


def _closed_by_the_broker(conn: kombu.Connection) -> None:
    """The broker tells a client that reads its socket (as workers do) that it closed it."""
    with pytest.raises(ConnectionForced):
        for _ in range(30):
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                continue


def test_rabbit_close_closes_the_connections_of_the_run_vhost():
    vhost = f"chaos-close-{uuid.uuid4().hex[:8]}"
    injectors.add_vhost(vhost)
    run = SimpleNamespace(lock=threading.Lock(), busy=set(), vhost=vhost)
    try:
        with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as conn:
            conn.connect()
            line = injectors.rabbit_close(run, None)  # type: ignore[arg-type]
            assert line.startswith("closed all connections"), line
            _closed_by_the_broker(conn)

        # While RabbitMQ restarts, the fault waits for it and closes what reconnected.
        run.busy.add("rabbit")
        with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as conn:
            conn.connect()
            threading.Timer(1.0, lambda: run.busy.discard("rabbit")).start()
            line = injectors.rabbit_close(run, None)  # type: ignore[arg-type]
            assert line.startswith("closed all connections"), line
            _closed_by_the_broker(conn)
    finally:
        injectors.sh("rabbitmqctl", "-q", "delete_vhost", vhost)
