"""The delivery path on Kafka against a real Kafka-protocol broker (noida-db): the relay's
confirmed, user-partitioned publish, real workers consuming in a group, offsets committed
after outcomes, replays split, a poison notification failed at the delivery limit, and
undecodable messages copied to the dead-letter topic without blocking the rows behind."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.test import override_settings

from notifications import kafka, notify, relay, streams
from notifications.models import Notification, OutboxMessage, StreamDelivery
from tests.conftest import kafka_env, kafka_settings, notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def on_kafka(kafka_bootstrap: str, kafka_topics: dict[str, str]) -> Iterator[dict[str, str]]:
    """This test's process relays to Kafka, with topics and a group of its own (four
    partitions); yields the environment for the worker processes it starts."""
    with override_settings(**kafka_settings(kafka_bootstrap, kafka_topics), NOTIFICATIONS_KAFKA_PARTITIONS=4):
        kafka._reset()
        yield {**kafka_env(kafka_bootstrap, kafka_topics), "NOTIFICATIONS_KAFKA_PARTITIONS": "4"}
    kafka._reset()


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 20.0) -> list[Any]:
    """Every message of ``topic`` (at least ``expect``), read by a group of its own."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,  # Tansu holds a new group's join for half of it
        }
    )
    consumer.subscribe([topic])
    got: list[Any] = []
    try:

        def enough() -> bool:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                got.append(msg)
            return len(got) >= expect

        wait_for(enough, timeout=timeout, interval=0, what=lambda: f"{len(got)} of {expect} messages in {topic}")
        while (msg := consumer.poll(0.5)) is not None:  # and nothing more than that
            if not msg.error():
                got.append(msg)
    finally:
        consumer.close()
    return got


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return {tp.partition: tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(4)], 10)}
    finally:
        consumer.close()


def ends(bootstrap: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(4)}
    finally:
        consumer.close()


@dataclass
class Read:
    """A message as the consumer reads it, for handing to ``DeliveryConsumer.handle``
    directly (confluent-kafka's Message cannot be made by hand)."""

    _topic: str
    _partition: int
    _offset: int
    _value: bytes
    _headers: list[tuple[str, bytes]] | None = None
    _timestamp: int | None = None

    def timestamp(self) -> tuple[int, int]:
        return (0, -1) if self._timestamp is None else (1, self._timestamp)  # TIMESTAMP_CREATE_TIME

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


def test_murmur2_places_keys_as_the_java_client_does() -> None:
    # Kafka's own UtilsTest vectors for Utils.murmur2.
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {k: kafka.murmur2(k) for k in vectors} == vectors
    assert kafka.partition_for("abc", 12) == (479470107 & 0x7FFFFFFF) % 12


def test_relay_publishes_each_user_to_its_partition_and_marks_rows_published(on_kafka: dict[str, str]) -> None:
    users = ["u-1", "u-2", "u-3", "ü-4"]
    made = [notify(**notification_kwargs(user_id=users[i % 4])) for i in range(12)]
    made.append(notify(**notification_kwargs(user_id="u-1", priority="high")))
    assert relay.drain() == 13
    assert not OutboxMessage.objects.filter(published_at__isnull=True).exists()

    bootstrap, topic = on_kafka["KAFKA_BOOTSTRAP_SERVERS"], on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]
    messages = read_topic(bootstrap, topic, expect=4)
    seen: dict[str, int] = {}
    for msg in messages:
        for payload in streams.decode(msg.value()):
            assert msg.partition() == kafka.partition_for(payload["user_id"], 4), payload["user_id"]
            seen[payload["key"]] = seen.get(payload["key"], 0) + 1
        assert dict(msg.headers())["content-type"] == b"application/json"
    assert seen == {n.key: 1 for n in made[:12]}  # each once, the normal topic only
    [high] = read_topic(bootstrap, on_kafka["NOTIFICATIONS_KAFKA_HIGH_TOPIC"], expect=1)
    assert [p["key"] for p in streams.decode(high.value())] == [made[12].key]
    assert high.key() == b"u-1"  # one user: keyed by it


def test_publish_to_an_unreachable_broker_leaves_the_rows_for_the_next_pass(
    on_kafka: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from notifications import broker

    n = notify(**notification_kwargs())
    kafka.ensure_topics()
    kafka.partition_count(on_kafka["NOTIFICATIONS_KAFKA_TOPIC"])
    monkeypatch.setattr(kafka, "CONFIRM_TIMEOUT", 1.0)
    with override_settings(NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"):
        kafka._producer = None  # a producer for a broker that is not there; topics known from before
        with pytest.raises(kafka.PublishError):
            broker.publish_deliveries(None, [OutboxMessage.objects.claim_pending(10, "default")[0].payload])  # type: ignore[arg-type]
        with pytest.raises(kafka.PublishError):
            relay.drain(budget=3)
    assert OutboxMessage.objects.get(notification=n).published_at is None
    kafka._reset()
    assert relay.drain() == 1
    assert Notification.objects.get(pk=n.pk).published_at is not None


def test_workers_deliver_from_kafka_and_commit_what_they_recorded(
    on_kafka: dict[str, str], workers: Any, smtp_server: Any
) -> None:
    env = on_kafka
    workers.start(concurrency=2, **env)
    made = [notify(**notification_kwargs(user_id=f"user-{i % 5}")) for i in range(20)]
    relay.drain()
    for n in made:
        smtp_server.wait_received(n.key, timeout=60)
    wait_for(lambda: Notification.objects.filter(pk__in=[n.pk for n in made], status="sent").count() == 20)
    assert all(smtp_server.count(n.key) == 1 for n in made)
    bootstrap, group, topic = (
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["NOTIFICATIONS_KAFKA_GROUP"],
        env["NOTIFICATIONS_KAFKA_TOPIC"],
    )
    end = ends(bootstrap, topic)
    wait_for(
        lambda: committed(bootstrap, group, topic) == {p: (e if e else -1001) for p, e in end.items()},
        timeout=20,
        what=lambda: (committed(bootstrap, group, topic), end),
    )
    assert kafka.deliveries_waiting() == 0


def test_a_poison_notification_fails_at_the_delivery_limit_and_the_rest_of_its_batch_is_sent(
    on_kafka: dict[str, str], workers: Any, smtp_server: Any
) -> None:
    """Kafka fault run: every crash of a poison message killed the consumer's process
    with it, and each cost the group a session timeout and a rebalance (about 10 s): the
    replays now run in a process of their own, so the worker's pool loses one process
    (the first start), not one per start. (The suite's delivery limit is 3; the fault
    run shows the shipped 10.)"""
    tag = uuid.uuid4().hex[:6]
    poison = notify(**notification_kwargs(service=f"poison{tag}", user_id="same"))
    rest = [notify(**notification_kwargs(user_id="same")) for _ in range(3)]  # one user: one message
    # It kills its worker before any claim (which would count attempts): the delivery limit ends it.
    env = dict(on_kafka, NOTIFICATIONS_CRASH_POINTS=f"before_claim=poison{tag}:")
    worker = workers.start(concurrency=2, **env)
    relay.drain()
    for n in rest:
        smtp_server.wait_received(n.key, timeout=90)
    failed = wait_for(
        lambda: Notification.objects.filter(pk=poison.pk, status="failed").first(), timeout=150, what="poison failed"
    )
    assert "crashed its worker 3 times" in failed.last_error
    assert smtp_server.count(poison.key) == 0
    assert all(smtp_server.count(n.key) == 1 for n in rest)
    [dead] = read_topic(on_kafka["KAFKA_BOOTSTRAP_SERVERS"], on_kafka["NOTIFICATIONS_KAFKA_DEAD_TOPIC"], expect=1)
    assert [p["key"] for p in streams.decode(dead.value())] == [poison.key]
    assert b"crashed its worker" in dict(dead.headers())["reason"]
    assert worker.output().count("exited with 'signal 9 (SIGKILL)'") == 1  # the pool lost one process
    assert "killed by signal 9 before reporting" in worker.output()  # the replays' crashes, in the sandbox
    assert "stopped; starting again" not in worker.output()  # and no consumer left its group for one


def test_an_undecodable_message_goes_to_the_dead_topic_and_the_next_one_is_delivered(on_kafka: dict[str, str]) -> None:
    from confluent_kafka import Producer
    from django.core import mail

    kafka.ensure_topics()
    topic = on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]
    producer = Producer({"bootstrap.servers": on_kafka["KAFKA_BOOTSTRAP_SERVERS"]})
    producer.produce(topic, value=b"\xff not json", partition=0)
    producer.produce(topic, value=json.dumps({"notifications": [{"no": "key"}]}).encode(), partition=0)
    assert producer.flush(10) == 0
    n = notify(**notification_kwargs(user_id="behind"))
    # The good one after them, in the same partition.
    payload = OutboxMessage.objects.claim_pending(10, "default")[0].payload
    producer.produce(topic, value=kafka.encode([payload]), partition=0)
    assert producer.flush(10) == 0

    consumer = streams.DeliveryConsumer(topic)
    consumer.start()
    try:
        wait_for(
            lambda: Notification.objects.filter(pk=n.pk, status="sent").exists(),
            timeout=60,
            what=lambda: list(Notification.objects.filter(pk=n.pk).values("status", "last_error", "attempts")),
        )
        # In this process pytest-django's locmem backend takes the email.
        assert [m.extra_headers["X-Notification-Key"] for m in mail.outbox] == [n.key]
    finally:
        consumer.stopping.set()
        consumer.join(15)
    dead = read_topic(on_kafka["KAFKA_BOOTSTRAP_SERVERS"], on_kafka["NOTIFICATIONS_KAFKA_DEAD_TOPIC"], expect=2)
    assert sorted(m.value() for m in dead) == sorted(
        [b"\xff not json", json.dumps({"notifications": [{"no": "key"}]}).encode()]
    )
    assert all(dict(m.headers())["reason"].startswith(b"undecodable") for m in dead)
    group = on_kafka["NOTIFICATIONS_KAFKA_GROUP"]
    assert committed(on_kafka["KAFKA_BOOTSTRAP_SERVERS"], group, topic)[0] == 3


def test_a_replayed_batch_is_split_into_single_messages(on_kafka: dict[str, str]) -> None:
    made = [notify(**notification_kwargs(user_id="one")) for _ in range(3)]
    payloads = [m.payload for m in OutboxMessage.objects.claim_pending(10, "default")]
    topic = on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]
    StreamDelivery.objects.create(topic=topic, partition=0, offset=0, attempts=1)  # started once, never finished

    streams.DeliveryConsumer(topic).handle(Read(topic, 0, 0, kafka.encode(payloads)))
    assert StreamDelivery.objects.get(topic=topic, partition=0, offset=0).attempts == 2
    singles = read_topic(on_kafka["KAFKA_BOOTSTRAP_SERVERS"], topic, expect=3)
    assert sorted(p["key"] for m in singles for p in streams.decode(m.value())) == sorted(n.key for n in made)
    assert all(len(streams.decode(m.value())) == 1 for m in singles)
    # The batch's first start crashed: each single goes on counting from there.
    assert all(dict(m.headers())["crashes"] == b"1" for m in singles)


def test_a_single_split_from_a_replayed_batch_goes_on_counting_its_crashes(on_kafka: dict[str, str]) -> None:
    """A poison notification's crashes before its batch was split count toward the
    delivery limit: a single whose batch crashed DELIVERY_LIMIT times fails at its own
    first start instead of crashing its worker again."""
    n = notify(**notification_kwargs(user_id="one"))
    [payload] = [m.payload for m in OutboxMessage.objects.claim_pending(10, "default")]
    topic = on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]

    crashed = [("content-type", b"application/json"), ("crashes", b"10")]
    streams.DeliveryConsumer(topic).handle(Read(topic, 0, 5, kafka.encode([payload]), crashed))
    failed = Notification.objects.get(pk=n.pk)
    assert failed.status == "failed"
    assert "crashed its worker 10 times" in failed.last_error
    [dead] = read_topic(on_kafka["KAFKA_BOOTSTRAP_SERVERS"], on_kafka["NOTIFICATIONS_KAFKA_DEAD_TOPIC"], expect=1)
    assert [p["key"] for p in streams.decode(dead.value())] == [n.key]


def test_a_message_at_the_offset_of_a_lost_log_counts_only_its_own_starts(on_kafka: dict[str, str]) -> None:
    """Kafka fault run: a broker that lost its log numbers the new one from 0 again. The
    start count of the poison message that had offset 5 before (past the delivery limit)
    must not end the good notification that has offset 5 now failed as crashed_worker."""
    from django.core import mail

    n = notify(**notification_kwargs(user_id="one"))
    [payload] = [m.payload for m in OutboxMessage.objects.claim_pending(10, "default")]
    topic = on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]
    StreamDelivery.objects.create(topic=topic, partition=0, offset=5, attempts=11, message_timestamp=1_000)

    streams.DeliveryConsumer(topic).handle(Read(topic, 0, 5, kafka.encode([payload]), None, 2_000))
    assert Notification.objects.get(pk=n.pk).status == "sent"
    assert [m.extra_headers["X-Notification-Key"] for m in mail.outbox] == [n.key]
    row = StreamDelivery.objects.get(topic=topic, partition=0, offset=5)
    assert (row.attempts, row.message_timestamp) == (1, 2_000)
    # The same message started again is a replay after a crash: counted on.
    assert streams.began(topic, 0, 5, 2_000) == 2


def test_a_group_offset_past_the_end_of_the_log_is_read_from_the_start(on_kafka: dict[str, str]) -> None:
    """Kafka fault run: after the broker lost its log, a member that had not yet noticed
    committed an offset of the old log. The new log is shorter, and Tansu answers a fetch
    past its end with no messages (Kafka answers OFFSET_OUT_OF_RANGE): the partition's
    notifications waited unread, and recovery republished them behind the same offset."""
    from confluent_kafka import Consumer, TopicPartition
    from django.core import mail

    topic = on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]
    bootstrap, group = on_kafka["KAFKA_BOOTSTRAP_SERVERS"], on_kafka["NOTIFICATIONS_KAFKA_GROUP"]
    kafka.ensure_topics()
    old = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        old.commit(offsets=[TopicPartition(topic, p, 50) for p in range(4)], asynchronous=False)
    finally:
        old.close()
    made = [notify(**notification_kwargs(user_id=f"user-{i}")) for i in range(4)]
    assert relay.drain() == 4
    consumer = streams.DeliveryConsumer(topic)
    consumer.start()
    try:
        wait_for(
            lambda: Notification.objects.filter(pk__in=[n.pk for n in made], status="sent").count() == 4,
            timeout=60,
            what=lambda: list(Notification.objects.filter(pk__in=[n.pk for n in made]).values("key", "status")),
        )
    finally:
        consumer.stopping.set()
        consumer.join(15)
    assert sorted(m.extra_headers["X-Notification-Key"] for m in mail.outbox) == sorted(n.key for n in made)
    used = {kafka.partition_for(f"user-{i}", 4) for i in range(4)}
    assert all(0 < offset < 50 for p, offset in committed(bootstrap, group, topic).items() if p in used)


def test_a_consumer_stuck_in_a_message_gives_its_partitions_up_after_the_poll_bound(on_kafka: dict[str, str]) -> None:
    """A consumer stuck in one message (a database call that never returns) leaves the
    group once ``poll_bound()`` has passed, so another member takes the partition and
    delivers the message, instead of it waiting behind a heartbeating consumer."""
    import threading
    import time

    from django.core import mail

    entered, release = threading.Event(), threading.Event()

    class Recording(streams.DeliveryConsumer):
        held: set[int] = set()

        def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
            self.held = {tp.partition for tp in partitions}
            super()._assigned(consumer, partitions)

    class Stuck(Recording):
        def handle(self, msg: Any) -> None:
            entered.set()
            release.wait(120)

    topic = on_kafka["NOTIFICATIONS_KAFKA_TOPIC"]
    with override_settings(NOTIFICATIONS_KAFKA_BUDGET=2.0, NOTIFICATIONS_CLAIM_LEASE=6.0):
        bound = streams.poll_bound()
        assert bound == 8.0
        kafka.ensure_topics()
        stuck, other = Stuck(topic), Recording(topic)
        stuck.start()
        other.start()
        try:
            # Both in the group, each with its share of the partitions.
            wait_for(
                lambda: stuck.held and other.held and stuck.held | other.held == {0, 1, 2, 3},
                timeout=30,
                what=lambda: (stuck.held, other.held),
            )
            user = next(u for u in (f"user-{i}" for i in range(100)) if kafka.partition_for(u, 4) in stuck.held)
            n = notify(**notification_kwargs(user_id=user))
            assert relay.drain() == 1
            wait_for(entered.is_set, timeout=30, what="the stuck consumer took the message")
            since = time.monotonic()
            wait_for(
                lambda: Notification.objects.filter(pk=n.pk, status="sent").exists(),
                timeout=bound + 20,
                what=lambda: list(Notification.objects.filter(pk=n.pk).values("status", "last_error")),
            )
            took = time.monotonic() - since
        finally:
            release.set()
            for consumer in (stuck, other):
                consumer.stopping.set()
            for consumer in (stuck, other):
                consumer.join(15)
    assert [m.extra_headers["X-Notification-Key"] for m in mail.outbox] == [n.key]
    assert took >= bound - 1, took  # not before the bound: a busy consumer keeps its partitions until then
    print(f"taken over {took:.1f}s after the stuck consumer took the message (bound {bound:.0f}s)")


def test_a_consume_error_is_passed_over_and_only_a_fatal_one_remakes_the_consumer(kafka_bootstrap: str) -> None:
    """A consumer subscribed to a topic the broker does not have gets a consume error
    (UNKNOWN_TOPIC_OR_PART, as after a broker lost its log): passed over, the consumer
    goes on polling; a fatal error is raised so the consumer is made anew."""
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"consume-error-{uuid.uuid4().hex[:8]}",
            "allow.auto.create.topics": False,
            "topic.metadata.refresh.interval.ms": 500,
        }
    )
    try:
        consumer.subscribe([f"missing-{uuid.uuid4().hex[:8]}"])

        def error() -> Any:
            msg = consumer.poll(0.5)
            return msg.error() if msg is not None and msg.error() else None

        seen = wait_for(error, timeout=20, what="a consume error")
        assert seen.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and not seen.fatal()
        streams.consume_error(seen)  # passed over
    finally:
        consumer.close()
    with pytest.raises(RuntimeError, match="fatal Kafka consumer error"):
        streams.consume_error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
