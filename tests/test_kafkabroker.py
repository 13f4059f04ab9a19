"""The local Kafka broker (project/kafkabroker.py) against confluent-kafka: it starts and
answers, carries messages from an idempotent producer to a consumer group, and a restart
keeps the messages and the group's committed offset. Also docker-compose.yml's ``kafka``
profile, the Apache Kafka this broker stands in for."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from project import kafkabroker
from tests.conftest import ROOT, wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[kafkabroker.Broker]:
    started = kafkabroker.start(data_dir=tmp_path / "kafka", engine="noida")
    yield started
    started.stop()


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        future.result(timeout=10)


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Publish with the settings the relay uses (idempotent, acks=all) and fail unless
    every delivery report succeeded."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    errors: list[KafkaError] = []

    def report(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            errors.append(error)

    for value in values:
        producer.produce(topic, value=value, key=b"user-42", on_delivery=report)
    assert producer.flush(15) == 0, "delivery reports outstanding"
    assert errors == []


def consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )


def take(client: Consumer, count: int, timeout: float = 20.0) -> list[Message]:
    """The next ``count`` messages, or fail after ``timeout``."""
    taken: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(taken) < count:
        assert time.monotonic() < deadline, f"got {len(taken)} of {count} messages within {timeout}s"
        message = client.poll(0.5)
        if message is None:
            continue
        assert message.error() is None, message.error()
        taken.append(message)
    return taken


def test_the_broker_answers_on_its_bootstrap_address(broker: kafkabroker.Broker) -> None:
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.running() and broker.pid > 0
    assert kafkabroker.answers(broker.bootstrap)
    assert (broker.data_dir / kafkabroker.PID_FILE).read_text().strip() == str(broker.pid)


def test_a_message_goes_from_a_producer_to_a_consumer_group(broker: kafkabroker.Broker) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, topic)
    produce(broker.bootstrap, topic, [b"one", b"two"])

    client = consumer(broker.bootstrap, f"g-{uuid.uuid4().hex[:8]}")
    client.subscribe([topic])
    try:
        assert [m.value() for m in take(client, 2)] == [b"one", b"two"]
    finally:
        client.close()


def test_a_restart_keeps_the_messages_and_the_committed_offset(broker: kafkabroker.Broker) -> None:
    topic, group = f"t-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, topic)
    produce(broker.bootstrap, topic, [b"a", b"b", b"c"])
    client = consumer(broker.bootstrap, group)
    client.subscribe([topic])
    try:
        first = take(client, 1)[0]
        # The next offset to read, as the worker commits it once a message's outcomes are recorded.
        client.commit(offsets=[TopicPartition(topic, 0, first.offset() + 1)], asynchronous=False)
    finally:
        client.close()
    port, pid = broker.port, broker.pid

    broker.restart()

    assert (broker.port, broker.bootstrap) == (port, f"127.0.0.1:{port}") and broker.pid != pid
    again = consumer(broker.bootstrap, group)
    again.subscribe([topic])
    try:
        assert [m.value() for m in take(again, 2)] == [b"b", b"c"]  # resumes after the committed one
    finally:
        again.close()
    everything = consumer(broker.bootstrap, f"g-{uuid.uuid4().hex[:8]}")
    everything.subscribe([topic])
    try:
        assert [m.value() for m in take(everything, 3)] == [b"a", b"b", b"c"]
    finally:
        everything.close()


def test_start_refuses_a_port_in_use(broker: kafkabroker.Broker, tmp_path: Path) -> None:
    with pytest.raises(kafkabroker.BrokerError, match="in use"):
        kafkabroker.start(port=broker.port, data_dir=tmp_path / "other", engine="noida")


def test_stop_ends_the_whole_process_group_and_keeps_the_data_dir(tmp_path: Path) -> None:
    started = kafkabroker.start(data_dir=tmp_path / "kafka", engine="noida")
    pid = started.pid
    started.stop()
    assert not kafkabroker._group_alive(pid)
    assert not kafkabroker.answers(started.bootstrap, timeout=1.0)
    assert (tmp_path / "kafka").is_dir() and not (tmp_path / "kafka" / kafkabroker.PID_FILE).exists()


def test_the_cli_starts_a_daemon_and_stops_it(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "kafka", kafkabroker.free_port()
    cli = [sys.executable, "-m", "project.kafkabroker"]
    started = subprocess.run(
        [*cli, "start", "--port", str(port), "--data-dir", str(data_dir), "--daemon"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    pid = int((data_dir / kafkabroker.PID_FILE).read_text())
    try:
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        assert kafkabroker.answers(f"127.0.0.1:{port}")
    finally:
        stopped = subprocess.run(
            [*cli, "stop", "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not kafkabroker._group_alive(pid)
    assert not (data_dir / kafkabroker.PID_FILE).exists()


def test_the_fixtures_give_each_test_its_own_topics_on_the_session_broker(
    on_kafka: dict[str, str], kafka_topics: dict[str, str]
) -> None:
    from django.conf import settings

    from tests.conftest import kafka_env

    assert kafkabroker.answers(on_kafka["bootstrap"])
    assert settings.NOTIFICATIONS_BROKER == "kafka"
    assert on_kafka["bootstrap"] == settings.NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS
    assert settings.NOTIFICATIONS_KAFKA_TOPIC == kafka_topics["topic"] != "notifications.deliver"
    assert len({kafka_topics[k] for k in ("topic", "high", "dead", "group")}) == 4
    env = kafka_env(on_kafka["bootstrap"], kafka_topics)
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == on_kafka["bootstrap"] and env["NOTIFICATIONS_BROKER"] == "kafka"


def test_compose_runs_apache_kafka_in_its_profile_and_points_worker_and_beat_at_it() -> None:
    """No Docker here: the file as Compose reads it. The local broker stands in for this one."""
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    kafka = services["kafka"]
    assert kafka["profiles"] == ["kafka"] and kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and env["KAFKA_NODE_ID"] == "1"
    assert "PLAINTEXT://:9092" in env["KAFKA_LISTENERS"].split(",")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert all(port.startswith("127.0.0.1:") for port in kafka["ports"])
    assert "kafka-data:/var/lib/kafka/data" in kafka["volumes"] and env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    for name in ("worker", "beat", "web"):
        service = services[name]
        assert "profiles" not in service  # they run in every profile; the environment picks the broker
        assert service["environment"]["NOTIFICATIONS_BROKER"] == "${NOTIFICATIONS_BROKER:-rabbitmq}"
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "${KAFKA_BOOTSTRAP_SERVERS:-kafka:9092}"
        # Without the profile there is no kafka service: a required dependency would refuse to start.
        assert service["depends_on"]["kafka"] == {"condition": "service_healthy", "required": False}


def test_the_dev_stack_runs_a_broker_in_its_state_dir_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make run BROKER=kafka``: a broker of its own (9092 there; a free port here), and a
    broker a killed earlier run left behind is stopped first rather than left holding the port."""
    from project.management.commands import devstack

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setattr(devstack, "KAFKA_PORT", kafkabroker.free_port())
    left = kafkabroker.start(devstack.KAFKA_PORT, tmp_path / "kafka", engine="noida")  # as if a killed run had left it
    command = devstack.Command()
    command.state_dir, command.kafka, command.write = tmp_path, None, lambda text: None

    try:
        bootstrap = command.start_kafka()

        assert not left.running() and bootstrap == f"127.0.0.1:{devstack.KAFKA_PORT}"
        assert kafkabroker.answers(bootstrap)
        assert command.kafka is not None and command.kafka.data_dir == tmp_path / "kafka"
    finally:
        left.stop()
        command.stop_kafka()
    assert not kafkabroker.answers(bootstrap, timeout=1.0)
    assert not (tmp_path / "kafka" / kafkabroker.PID_FILE).exists()


def test_tansu_hands_a_killed_consumers_partitions_to_the_live_one(tmp_path: Path) -> None:
    """What the crash tests and the chaos run rely on: a member whose heartbeats stop is
    ended after session.timeout.ms, as in Kafka (noida-db keeps it forever)."""
    import signal
    import textwrap

    with kafkabroker.start(engine="tansu") as tansu:
        admin = AdminClient({"bootstrap.servers": tansu.bootstrap})
        for future in admin.create_topics([NewTopic("t", 4, 1)]).values():
            future.result(10)
        config = {
            "bootstrap.servers": tansu.bootstrap,
            "group.id": "g",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
        assigned: list[int] = []
        live = Consumer(config)
        live.subscribe(["t"], on_assign=lambda c, ps: assigned.__setitem__(slice(None), [p.partition for p in ps]))
        wait_for(lambda: live.poll(0.2) is None and len(assigned) == 4, timeout=30, what="all four partitions")
        other = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
                from confluent_kafka import Consumer
                c = Consumer({config!r})
                c.subscribe(["t"], on_assign=lambda c, ps: print(len(ps), flush=True))
                while True:
                    c.poll(0.2)
            """),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            # The live member must go on polling for the group to rebalance.
            wait_for(lambda: live.poll(0.2) is None and 0 < len(assigned) < 4, timeout=30, what="a rebalance")
            assert other.stdout is not None and int(other.stdout.readline()) == 4 - len(assigned)
            other.send_signal(signal.SIGKILL)
            other.wait(10)
            wait_for(lambda: live.poll(0.2) is None and len(assigned) == 4, timeout=30, what="the partitions back")
        finally:
            other.kill()
            live.close()
