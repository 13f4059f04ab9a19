"""The delivery path on Kafka: the topics, and the relay's confirmed publish.

With ``NOTIFICATIONS_BROKER = "kafka"`` the relay publishes delivery messages here
instead of to RabbitMQ, and every worker process consumes them (``streams``). The
message is the same list of whole notifications, as JSON, in a topic instead of a queue.

What plays RabbitMQ's publisher confirms is the idempotent producer's delivery reports
(``acks=all``): ``publish_deliveries`` returns only once every message it produced was
reported written by all in-sync replicas, and the relay marks its rows published only
then. A message reported failed, or not reported in time, fails the call, and the rows
stay for the next pass (a copy that did get written is harmless: the claims).

A message goes to the partition of its user (``partition_for``: the murmur2 hash Java
clients use for a key, so a message keyed by user id lands where it would from any
Kafka client), so one user's notifications stay in order in one partition, and a
batch carries only notifications of one partition.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import metrics
from .conf import settings

if TYPE_CHECKING:
    from .broker import Refused

logger = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 10.0  # seconds for the delivery reports of one publish (plus one per MiB)
METADATA_TTL = 30.0  # seconds a topic's partition count is trusted before it is read again
FORMAT = b"1"  # the message format: {"notifications": [payload, ...]}

_lock = threading.Lock()
_producer: Any = None
_admin: Any = None
_partitions: dict[str, tuple[int, float]] = {}
_topics_ready: set[tuple[str, str]] = set()


class PublishError(Exception):
    """Kafka did not confirm every message of a publish: the rows stay unpublished."""


def enabled() -> bool:
    """Whether deliveries travel through Kafka (``NOTIFICATIONS_BROKER``)."""
    return str(settings.BROKER) == "kafka"


def client_config() -> dict[str, Any]:
    """The settings every Kafka client of the pipeline shares: the brokers, and the
    security settings (``NOTIFICATIONS_KAFKA_CONFIG``: SASL, TLS) on top.

    No client asks the broker to create a topic it looks up: a broker that creates
    topics on first use gives them its own partition count (Tansu 4, Kafka's
    ``num.partitions`` 1), and a delivery topic that came back so after the broker lost
    its log would carry every user on a few partitions. ``ensure_topics`` creates them
    with ``NOTIFICATIONS_KAFKA_PARTITIONS`` instead, when a lookup finds one missing."""
    return {
        "bootstrap.servers": str(settings.KAFKA_BOOTSTRAP_SERVERS),
        "allow.auto.create.topics": False,
        **dict(settings.KAFKA_CONFIG or {}),
    }


def delivery_topics() -> list[str]:
    """The delivery topics, high priority first."""
    return [str(settings.KAFKA_HIGH_TOPIC), str(settings.KAFKA_TOPIC)]


def _on_error(err: Any) -> None:
    # Transient errors (a broker gone) are retried by librdkafka itself; a fatal one
    # leaves the idempotent producer unusable, so the next publish makes a new one.
    if err.fatal():
        logger.error("Kafka producer fatal error: %s", err)
        _reset()
    else:
        logger.debug("Kafka client error: %s", err)


def _reset_if_fatal(exc: Exception) -> None:
    """A produce() refused because the producer is in a fatal state (an idempotent one
    whose sequence the broker lost, as after a broker lost its log) raises before any
    poll serves the error callback: drop the producer here, so the next publish makes a
    new one instead of failing for good."""
    from confluent_kafka import KafkaError

    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL):
        logger.error("Kafka producer in a fatal state (%s): a new one is made", err)
        _reset()


def _reset_after_report(err: Any) -> None:
    """A delivery report failed: make a new producer for the next publish. A broker that
    lost its log (or its producer state) answers an idempotent producer's every later
    message with PRODUCER_FENCED or UNKNOWN_PRODUCER_ID, which librdkafka does not treat
    as fatal; keeping the producer would fail every publish after it, the relay's and the
    dead-letter copies alike. A new one costs a connection and a producer id, once."""
    logger.warning("Kafka delivery report failed (%s): a new producer is made", err)
    _reset()


def producer() -> Any:
    """This process's producer (librdkafka's is thread-safe; one per process)."""
    global _producer
    with _lock:
        if _producer is None:
            from confluent_kafka import Producer

            _producer = Producer(
                {
                    **client_config(),
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 2,
                    # A report comes within this, success or failure: a pass never waits
                    # longer for the broker than the relay allows it.
                    "message.timeout.ms": int(CONFIRM_TIMEOUT * 3 * 1000),
                    "message.max.bytes": int(settings.MAX_MESSAGE_BYTES) + 64 * 1024,
                    "partitioner": "murmur2_random",
                    "error_cb": _on_error,
                }
            )
        return _producer


def admin() -> Any:
    global _admin
    with _lock:
        if _admin is None:
            from confluent_kafka.admin import AdminClient

            _admin = AdminClient(client_config())
        return _admin


def _reset() -> None:
    global _producer, _admin
    with _lock:
        _producer = None
        _admin = None
        _partitions.clear()
        _topics_ready.clear()


def _after_fork() -> None:
    # librdkafka's clients do not survive a fork (their threads stay in the parent): a
    # forked process (a prefork pool process) makes its own.
    global _producer, _admin, _lock
    _lock = threading.Lock()
    _producer = None
    _admin = None
    _partitions.clear()
    _topics_ready.clear()


os.register_at_fork(after_in_child=_after_fork)


def _forget_topics() -> None:
    """After a failed publish: read the topics anew next time (a broker that lost its log
    lost them too, and they are created again)."""
    _partitions.clear()
    _topics_ready.clear()


def ensure_topics(again: bool = False) -> None:
    """Create the delivery and dead-letter topics when they do not exist
    (``NOTIFICATIONS_KAFKA_PARTITIONS``, ``NOTIFICATIONS_KAFKA_REPLICATION_FACTOR``); once
    per process and set of names, unless ``again`` (one was found missing: a broker
    that lost its log). Topics that exist are left as they are."""
    if again:
        _topics_ready.clear()
    names = [*delivery_topics(), str(settings.KAFKA_DEAD_TOPIC)]
    where = str(settings.KAFKA_BOOTSTRAP_SERVERS)
    todo = [n for n in names if (where, n) not in _topics_ready]
    if not todo:
        return
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import NewTopic

    new = [
        NewTopic(
            n, num_partitions=int(settings.KAFKA_PARTITIONS), replication_factor=int(settings.KAFKA_REPLICATION_FACTOR)
        )
        for n in todo
    ]
    for name, future in admin().create_topics(new, operation_timeout=10, request_timeout=15).items():
        try:
            future.result()
            logger.info("created Kafka topic %s", name)
        except Exception as exc:
            error = exc.args[0] if exc.args else None
            if getattr(error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise PublishError(f"Kafka topic {name!r} neither found nor created: {exc}") from exc
        _topics_ready.add((where, name))


def partition_count(topic: str) -> int:
    """The topic's partitions, from metadata read at most every ``METADATA_TTL`` seconds."""
    known = _partitions.get(topic)
    if known and time.monotonic() - known[1] < METADATA_TTL:
        return known[0]
    from confluent_kafka import KafkaError, KafkaException

    for attempt in range(2):
        try:
            meta = producer().list_topics(topic, timeout=5)
        except KafkaException as exc:
            raise PublishError(f"no metadata for Kafka topic {topic!r}: {exc}") from exc
        entry = meta.topics.get(topic)
        if entry is not None and entry.error is None and entry.partitions:
            break
        missing = entry is None or entry.error is None or entry.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        if attempt == 0 and missing:
            # Gone (a broker that lost its log): made again, with our partition count.
            logger.warning("Kafka topic %s not found: creating the delivery topics again", topic)
            ensure_topics(again=True)
            continue
        raise PublishError(f"Kafka topic {topic!r} has no partitions ({entry.error if entry else 'missing'})")
    count = len(entry.partitions)
    _partitions[topic] = (count, time.monotonic())
    return count


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's ``Utils.murmur2``), as a signed 32-bit int."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    end = length - length % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    if rest >= 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(user_id: str, partitions: int) -> int:
    """The partition a message keyed by ``user_id`` goes to, as Java clients and
    librdkafka's ``murmur2_random`` partitioner place it."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def encode(payloads: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"notifications": list(payloads)}, ensure_ascii=False, separators=(",", ":")).encode()


def _groups(payloads: Sequence[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """``payloads`` by topic (high first), partition and backend, in order."""
    from .broker import _grouped

    out: list[tuple[str, int, list[dict[str, Any]]]] = []
    for queue, group in _grouped(payloads):
        topic = str(settings.KAFKA_HIGH_TOPIC if queue == settings.HIGH_QUEUE else settings.KAFKA_TOPIC)
        count = partition_count(topic)
        by_partition: dict[int, list[dict[str, Any]]] = {}
        for payload in group:
            by_partition.setdefault(partition_for(str(payload.get("user_id", "")), count), []).append(payload)
        out += [(topic, p, batch) for p, batch in by_partition.items()]
    return out


# The header of a message split from a replayed one: how many of that message's starts
# crashed their worker, so that its notifications' count toward the delivery limit goes on.
CRASHES_HEADER = "crashes"


def publish_deliveries(
    payloads: Sequence[dict[str, Any]], per_message: int | None = None, crashes: int = 0
) -> list[Refused]:
    """Publish ``payloads`` as delivery messages (``per_message`` each, at most the
    batch sizes of ``broker.publish_deliveries``) and wait for every delivery report;
    return the notifications Kafka cannot carry (too large), which the caller ends failed.
    ``crashes``: the crashed starts of the message they come from (a header), if any.
    Raises ``PublishError`` if any other message was not confirmed."""
    from confluent_kafka import KafkaError, KafkaException

    from .broker import Refused, _confirm_timeout, pack

    if not payloads:
        return []
    ensure_topics()
    messages: list[tuple[str, int, list[dict[str, Any]]]] = []
    refused: list[Refused] = []
    for topic, partition, group in _groups(payloads):
        high = topic == settings.KAFKA_HIGH_TOPIC
        default = int(settings.HIGH_BATCH_SIZE if high else settings.DELIVERY_BATCH_SIZE)
        size = max(1, min(per_message or default, default))
        packed, too_large = pack(group, size, int(settings.MAX_MESSAGE_BYTES))
        messages += [(topic, partition, batch) for batch in packed]
        refused += too_large
    if not messages:
        return refused
    reports: list[tuple[int, Any]] = []
    prod = producer()
    too_large_batches: list[list[dict[str, Any]]] = []
    produced = 0
    headers = [("content-type", b"application/json"), ("notifications-format", FORMAT)]
    if crashes > 0:
        headers.append((CRASHES_HEADER, str(crashes).encode()))
    for index, (topic, partition, batch) in enumerate(messages):
        users = {str(p.get("user_id", "")) for p in batch}
        key = next(iter(users)).encode() if len(users) == 1 else None

        def report(err: Any, msg: Any, index: int = index) -> None:
            reports.append((index, err))

        while True:
            try:
                prod.produce(
                    topic,
                    value=encode(batch),
                    key=key,
                    partition=partition,
                    headers=headers,
                    on_delivery=report,
                )
                produced += 1
                break
            except BufferError:
                prod.poll(0.1)  # the local queue is full: let reports drain it
            except KafkaException as exc:
                if exc.args and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    too_large_batches.append(batch)
                    break
                _reset_if_fatal(exc)
                raise
    timeout = _confirm_timeout([(None, batch) for _, _, batch in messages])  # type: ignore[misc]
    try:
        left = prod.flush(timeout)
    except Exception as exc:  # a fatal error raised from the callbacks flush() serves
        _reset_after_report(exc)
        raise PublishError(f"Kafka publish failed: {exc!r}") from exc
    if left or len(reports) < produced:
        # What is still queued locally goes no further: the next pass publishes it again.
        prod.purge(in_queue=True, in_flight=False)
        prod.poll(0)
        _forget_topics()
        raise PublishError(f"{produced - len(reports)} Kafka message(s) unconfirmed after {timeout:.0f}s")
    failed = [(index, err) for index, err in reports if err is not None]
    for index, err in failed:
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            too_large_batches.append(messages[index][2])
        else:
            _reset_after_report(err)
            raise PublishError(f"Kafka did not take {len(failed)} message(s): {err}")
    for batch in too_large_batches:
        if len(batch) == 1:
            refused.append(Refused(str(batch[0]["key"]), "the Kafka broker refused the message as too large"))
        else:
            refused += publish_deliveries(batch, per_message=1, crashes=crashes)
    metrics.MESSAGES_PUBLISHED.inc(produced - len(too_large_batches))
    return refused


def publish_dead(value: bytes | None, headers: list[tuple[str, bytes]], key: bytes | None = None) -> None:
    """Copy a message the workers cannot deliver to ``NOTIFICATIONS_KAFKA_DEAD_TOPIC``
    (Kafka has no dead-letter queue of its own), confirmed; raises if not written."""
    ensure_topics()
    errors: list[Any] = []
    prod = producer()
    try:
        prod.produce(
            str(settings.KAFKA_DEAD_TOPIC),
            value=value,
            key=key,
            headers=headers,
            on_delivery=lambda err, msg: errors.append(err),
        )
    except Exception as exc:
        _reset_if_fatal(exc)
        raise
    try:
        left = prod.flush(CONFIRM_TIMEOUT)
    except Exception as exc:
        _reset_after_report(exc)
        raise PublishError(f"the dead-letter copy was not confirmed ({exc!r})") from exc
    if left or not errors or errors[0] is not None:
        if errors and errors[0] is not None:
            _reset_after_report(errors[0])
        raise PublishError(f"the dead-letter copy was not confirmed ({errors[0] if errors else 'timeout'})")


def _positions() -> dict[tuple[str, int], tuple[int, int]]:
    """Per delivery topic partition: (its end offset, the group's committed offset, -1 if none)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    client = admin()
    partitions = [TopicPartition(t, p) for t in delivery_topics() for p in range(partition_count(t))]
    latest = client.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=5)
    ends = {(tp.topic, tp.partition): future.result().offset for tp, future in latest.items()}
    request = [ConsumerGroupTopicPartitions(str(settings.KAFKA_GROUP), partitions)]
    committed: dict[tuple[str, int], int] = {}
    for future in client.list_consumer_group_offsets(request, request_timeout=5).values():
        for tp in future.result().topic_partitions:
            committed[(tp.topic, tp.partition)] = tp.offset
    return {where: (end, committed.get(where, -1)) for where, end in ends.items()}


def lag_by_topic() -> dict[str, int]:
    """Per delivery topic, messages waiting behind the one a consumer works on: for each
    partition, published and not committed by the group, less the one in progress."""
    out: dict[str, int] = {}
    for (topic, _), (end, done) in _positions().items():
        waiting = end - max(done, 0) if done >= 0 else end
        out[topic] = out.get(topic, 0) + max(0, waiting - 1)
    return out


def settled_partitions() -> set[tuple[str, int]] | None:
    """The delivery partitions the group has read to their end (every message in them
    committed), or whose log ends before the group's offset (a broker that lost it):
    a notification published to one of these and never claimed had its message lost.
    None when Kafka cannot be asked."""
    try:
        positions = _positions()
    except Exception as exc:
        logger.debug("Kafka offsets not read: %r", exc)
        return None
    return {where for where, (end, done) in positions.items() if end == 0 or done >= end}


def partition_counts() -> dict[str, int] | None:
    """The delivery topics' partition counts, or None when Kafka cannot say now."""
    try:
        return {topic: partition_count(topic) for topic in delivery_topics()}
    except Exception as exc:
        logger.debug("Kafka partition counts not read: %r", exc)
        return None


def deliveries_waiting() -> int:
    """Delivery messages waiting for a consumer (``lag_by_topic`` summed); 0 when Kafka
    cannot be asked, as with RabbitMQ: the relay then publishes as it would anyway."""
    try:
        return sum(lag_by_topic().values())
    except Exception as exc:
        logger.debug("Kafka lag not read: %r", exc)
        return 0
