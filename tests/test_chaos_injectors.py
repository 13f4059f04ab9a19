"""The chaos run's faults do what their report lines say: a run that believes it closed
the broker's connections when it did not proves nothing."""

from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace

import kombu
import pytest

from notifications.chaos import injectors
from tests.conftest import wait_for


def _connections(vhost: str) -> int:
    done = injectors.sh("rabbitmqctl", "-q", "list_connections", "-p", vhost, "name")
    return len([line for line in done.stdout.splitlines() if "->" in line])


def test_rabbit_close_closes_the_connections_of_the_run_vhost():
    vhost = f"chaos-close-{uuid.uuid4().hex[:8]}"
    injectors.add_vhost(vhost)
    try:
        conn = kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        conn.connect()
        wait_for(lambda: _connections(vhost) == 1, timeout=20, what="the connection listed")
        run = SimpleNamespace(lock=threading.Lock(), busy=set(), vhost=vhost)

        line = injectors.rabbit_close(run, None)  # type: ignore[arg-type]

        assert line.startswith("closed all connections"), line
        # The broker tells the client; a client that reads its socket (as workers do) sees it.
        with pytest.raises(Exception, match="(?i)closed|forced|connection"):
            for _ in range(20):
                conn.drain_events(timeout=1)
        wait_for(lambda: _connections(vhost) == 0, timeout=20, what="the connection closed")
        # While RabbitMQ restarts, the fault waits for it and closes what reconnected.
        run.busy.add("rabbit")
        conn = kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        conn.connect()
        wait_for(lambda: _connections(vhost) == 1, timeout=20, what="the new connection listed")
        threading.Timer(1.0, lambda: run.busy.discard("rabbit")).start()
        assert injectors.rabbit_close(run, None).startswith("closed all connections")  # type: ignore[arg-type]
    finally:
        injectors.sh("rabbitmqctl", "-q", "delete_vhost", vhost)
