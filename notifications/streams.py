"""The worker side of Kafka: every worker process consumes the delivery topics.

With ``NOTIFICATIONS_BROKER = "kafka"``, ``celery -A project worker`` starts, in each of
its pool processes, one consumer per delivery topic (high priority and normal), all in
the group ``NOTIFICATIONS_KAFKA_GROUP``: Kafka gives each partition to one of them, so
the partitions cap how many processes deliver at once. kombu's own Kafka transport is
not used: it commits every assigned partition at once.

A consumer works on one message at a time and commits that message's partition offset,
and only that one, after every outcome of it is recorded (sent, failed, or queued again
in the outbox). A crash, a cut connection or a rebalance before the commit replays the
message, and the claims make the replay harmless. Retries and scheduled sends are due
outbox rows, as on RabbitMQ: nothing waits in Kafka for later.

Kafka has no delivery limit or dead-letter queue, so the starts of each message are
counted in PostgreSQL (``StreamDelivery``): a message started before is a replay after a
crash and is split into one message per notification, as RabbitMQ's redelivered batches
are; a message started more than ``NOTIFICATIONS_DELIVERY_LIMIT`` times ends its
notifications failed (``crashed_worker``), and it, like a message no worker can decode,
is copied to ``NOTIFICATIONS_KAFKA_DEAD_TOPIC`` before its offset is committed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from typing import Any

from django.db import close_old_connections, connections

from . import kafka, metrics
from .conf import settings

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
MAX_BACKOFF = 30.0
END_CHECK_SECONDS = 5.0  # how often an idle consumer looks for a group offset past its log's end

_consumers: list[DeliveryConsumer] = []
_started_in: int | None = None


def _backoff(failures: int) -> float:
    return min(MAX_BACKOFF, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)


def consume_error(error: Any) -> None:
    """A consume error (``KafkaError``) the consumer polled: logged and passed over (the
    client retries on its own: a broker away, a partition at its end; a topic gone is
    mended at the join that follows, ``DeliveryConsumer._assigned``), or raised when
    fatal, so the consumer is made anew."""
    if error.fatal():
        raise RuntimeError(f"fatal Kafka consumer error: {error}")
    logger.debug("Kafka consume error: %s", error)


def decode(value: bytes | None) -> list[dict[str, Any]]:
    """The notifications of a delivery message; ValueError if it carries none we can read."""
    if value is None:
        raise ValueError("the message has no value")
    body = json.loads(value)
    payloads = body.get("notifications") if isinstance(body, dict) else None
    if not isinstance(payloads, list) or not payloads:
        raise ValueError("no list of notifications in the message")
    for payload in payloads:
        if not isinstance(payload, dict) or not isinstance(payload.get("key"), str):
            raise ValueError("a notification without a key")
    return payloads


def poll_bound() -> float:
    """Seconds a consumer may spend in one message before it gives up its partitions.

    A message's sends stop after ``KAFKA_BUDGET`` (the rest goes back through the outbox);
    a send started just before that has a claim lease's worth more to finish and be
    recorded. A consumer still in the message after both is stuck (a database that does
    not answer, typically): its claims' leases ran out, recovery publishes their
    notifications again, to the same partition, and they must not wait behind it. A
    healthy consumer that overruns it only costs a rebalance: the message is replayed,
    and its claims make that harmless."""
    return float(settings.KAFKA_BUDGET) + float(settings.CLAIM_LEASE)


def crashes_before(msg: Any) -> int:
    """The crashed starts a message inherits from the replayed message it was split from
    (its ``crashes`` header; 0 for any other message)."""
    for name, value in msg.headers() or ():
        if name == kafka.CRASHES_HEADER:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0


def timestamp(msg: Any) -> int | None:
    """The message's timestamp (ms), which tells two messages at one offset apart: a
    broker that lost its log numbers the new one from 0 again. None if it has none."""
    kind, value = msg.timestamp()
    return int(value) if kind and value >= 0 else None


def began(topic: str, partition: int, offset: int, stamp: int | None = None) -> int:
    """Count a start of the message at ``offset`` (with timestamp ``stamp``) and return
    its starts so far; rows of the partition's earlier offsets, done with, go in the same
    statement. A row of that offset with another timestamp was another message's, of a
    log the broker lost: its count starts over, so a message is never failed at the
    delivery limit for the crashes of the one that had its offset before."""
    from .models import StreamDelivery

    table = connections[settings.DATABASE].ops.quote_name(StreamDelivery._meta.db_table)
    with connections[settings.DATABASE].cursor() as cursor:
        cursor.execute(
            f'WITH done AS (DELETE FROM {table} WHERE topic = %s AND partition = %s AND "offset" < %s) '
            f'INSERT INTO {table} (topic, partition, "offset", message_timestamp, attempts) VALUES (%s, %s, %s, %s, 1) '
            f'ON CONFLICT (topic, partition, "offset") DO UPDATE SET attempts = CASE WHEN '
            f"{table}.message_timestamp IS DISTINCT FROM EXCLUDED.message_timestamp THEN 1 "
            f"ELSE {table}.attempts + 1 END, message_timestamp = EXCLUDED.message_timestamp, "
            "started_at = now() RETURNING attempts",
            [topic, partition, offset, topic, partition, offset, stamp],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 1


class Retry(Exception):
    """The message cannot be finished now (its outcomes could not be recorded): its
    partition goes back to it after ``delay`` seconds, uncommitted."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(why)
        self.delay = delay


class DeliveryConsumer(threading.Thread):
    """One consumer of one delivery topic, in a thread of a worker process."""

    def __init__(self, topic: str) -> None:
        super().__init__(name=f"kafka-{topic}", daemon=True)
        self.topic = topic
        self.stopping = threading.Event()
        self.failures = 0
        self.ready = threading.Event()  # set once the group gave this consumer partitions (or none)
        self.consumer: Any = None
        # (partition, offset) this consumer itself goes back to -> the starts it counted
        self._again: dict[tuple[int, int], int] = {}
        self._starts = 1  # of the message in hand
        self._reread: dict[tuple[str, int], int] = {}  # partition -> the offset past its end it was reread from
        self.topic_lost = False  # the topic was missing at a join: join again once it is back

    def _config(self) -> dict[str, Any]:
        session = int(float(settings.KAFKA_SESSION_TIMEOUT) * 1000)
        return {
            **kafka.client_config(),
            "group.id": str(settings.KAFKA_GROUP),
            "client.id": f"notifications-{os.getpid()}-{self.topic}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": session,
            "heartbeat.interval.ms": max(500, session // 4),
            # A consumer still in one message after poll_bound() leaves the group, and its
            # partitions move on (on Apache Kafka also the longest a rebalance waits for it).
            "max.poll.interval.ms": max(session, int(poll_bound() * 1000)),
            # One message at a time is all a consumer takes; fetching far ahead only
            # holds messages another consumer could take after a rebalance.
            "queued.max.messages.kbytes": 8192,
            # How long a fetch waits for data. Apache Kafka answers a waiting fetch as soon as
            # data arrives; some Kafka-protocol brokers (Tansu) answer only when it times out,
            # which then is the latency of every message at light load (librdkafka's 500 ms).
            "fetch.wait.max.ms": 100,
            # A topic the broker lost (and the relay created again) is seen within this;
            # librdkafka's default of 5 minutes would leave its partitions unassigned.
            "topic.metadata.refresh.interval.ms": 10_000,
            "error_cb": lambda err: logger.debug("Kafka consumer error: %s", err),
        }

    def run(self) -> None:
        from confluent_kafka import Consumer

        while not self.stopping.is_set():
            try:
                kafka.ensure_topics()
                self.consumer = Consumer(self._config())
                self._subscribe()
                self._loop()
            except Exception:
                logger.exception("Kafka consumer of %s stopped; starting again", self.topic)
                self.stopping.wait(_backoff(self.failures))
                self.failures += 1
            finally:
                self._close()

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked)

    def _rejoin_when_back(self) -> None:
        """Once the lost topic exists again (created by this call, or by the relay),
        subscribe to it anew.

        A member that joined while the topic was missing (a broker that lost its log)
        was given no partitions, and librdkafka does not always join again when the
        topic comes back: no error reaches the application, the member stays with none,
        and every notification published to the topic waits. A join of its own costs
        one more rebalance, once."""
        from confluent_kafka import KafkaException

        try:
            kafka.ensure_topics(again=True)
        except (KafkaException, kafka.PublishError) as exc:
            logger.debug("Kafka topic %s not created: %r", self.topic, exc)
        if not self._topic_exists(self.consumer):
            return
        logger.warning("Kafka topic %s is back: joining its group again", self.topic)
        self.topic_lost = False
        self.consumer.unsubscribe()
        self._subscribe()

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        logger.info(
            "Kafka consumer of %s (process %d) assigned partitions %s", self.topic, os.getpid(), _numbers(partitions)
        )
        if not partitions and not self.topic_lost and not self._topic_exists(consumer):
            # Joined while the topic is missing: librdkafka does not always join again
            # when it comes back (no error reaches the application either).
            logger.warning("Kafka topic %s is missing (a broker that lost its log)", self.topic)
            self.topic_lost = True
        self.ready.set()

    def _topic_exists(self, consumer: Any) -> bool:
        from confluent_kafka import KafkaException

        try:
            entry = consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        except KafkaException:
            return True  # cannot tell now: nothing to mend
        return entry is not None and entry.error is None and bool(entry.partitions)

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        logger.info(
            "Kafka consumer of %s (process %d) gave up partitions %s", self.topic, os.getpid(), _numbers(partitions)
        )
        # Their next owner counts their starts; if they come back here, so does this one.
        gone = {tp.partition for tp in partitions}
        self._again = {where: starts for where, starts in self._again.items() if where[0] not in gone}

    def _close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: its partitions move on at once
            except Exception as exc:
                logger.debug("Kafka consumer close: %r", exc)
            self.consumer = None

    def _loop(self) -> None:
        paused: dict[Any, tuple[float, int]] = {}  # partition -> (resume at, offset)
        checked = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            for tp, (at, offset) in list(paused.items()):
                if at <= now:
                    del paused[tp]
                    self._resume(tp, offset)
            msg = self.consumer.poll(POLL_SECONDS)
            if msg is None:
                if time.monotonic() - checked >= END_CHECK_SECONDS:
                    checked = time.monotonic()
                    if self.topic_lost:
                        self._rejoin_when_back()
                    self._reread_lost_logs({(tp.topic, tp.partition) for tp in paused})
                continue
            if any(tp.topic == msg.topic() and tp.partition == msg.partition() for tp in paused):
                continue  # fetched before the pause: read again from its offset on resume
            if msg.error():
                consume_error(msg.error())
                continue
            try:
                self.handle(msg)
            except Retry as again:
                from confluent_kafka import TopicPartition

                tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                logger.warning(
                    "Kafka message %s[%d]@%d: %s; again in %.1fs",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    again,
                    again.delay,
                )
                self.consumer.pause([tp])
                paused[tp] = (time.monotonic() + again.delay, msg.offset())
                self._again[(msg.partition(), msg.offset())] = self._starts
                continue
            self._commit(msg)

    def _reread_lost_logs(self, paused: set[tuple[str, int]]) -> None:
        """Read from its start a partition whose log ends before this consumer's position
        or the group's committed offset.

        That is a broker that lost its log (and numbers the new one from 0 again), with
        the group's offset of the old one kept or committed again by a member that had
        not yet noticed. Kafka answers a fetch past the end OFFSET_OUT_OF_RANGE, and
        ``auto.offset.reset`` starts the partition over; a broker that answers it with
        no messages instead (Tansu) would leave the partition unread until its new log
        grew past the old offset, and every notification published to it meanwhile
        waiting. Reading a partition again from its start is harmless: the claims."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        try:
            assignment = [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in paused]
            if not assignment:
                return
            positions = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.position(assignment)}
            committed = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.committed(assignment, timeout=5)}
            for tp in assignment:
                where = (tp.topic, tp.partition)
                at = max(positions.get(where, -1), committed.get(where, -1))
                if at <= 0:
                    continue
                _, end = self.consumer.get_watermark_offsets(tp, cached=True)  # from this consumer's fetches
                if end < 0:
                    _, end = self.consumer.get_watermark_offsets(tp, timeout=5)
                if 0 <= end < at and self._reread.get(where) != at:
                    logger.warning(
                        "Kafka partition %s[%d]: at offset %d, past the end of its log (%d): the broker lost its "
                        "log; reading the partition again from its start",
                        tp.topic,
                        tp.partition,
                        at,
                        end,
                    )
                    self.consumer.seek(TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
                    self._reread[where] = at  # once: the committed offset stays until the first commit
        except Exception as exc:  # a broker away now: the next check looks again
            logger.debug("Kafka log ends not checked: %r", exc)

    def _resume(self, tp: Any, offset: int) -> None:
        from confluent_kafka import TopicPartition

        # Resume first: librdkafka keeps a partition paused across a rebalance, and the
        # seek fails (_STATE) while another member holds it; a partition that came back
        # to this consumer still paused would never be read again.
        try:
            self.consumer.resume([tp])
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        except Exception as exc:
            # Revoked meanwhile: its new owner starts from the committed offset.
            logger.debug("Kafka partition %s[%d] not resumed at its offset: %r", tp.topic, tp.partition, exc)

    def _commit(self, msg: Any) -> None:
        from confluent_kafka import TopicPartition

        self._again.pop((msg.partition(), msg.offset()), None)
        try:
            self.consumer.commit(
                offsets=[TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)], asynchronous=False
            )
        except Exception as exc:
            # Not committed: the message is replayed by whoever holds the partition next,
            # and finds its claims settled.
            logger.warning("Kafka offset %s[%d]@%d not committed: %r", msg.topic(), msg.partition(), msg.offset(), exc)

    def handle(self, msg: Any) -> None:
        """Deliver one message, or record what becomes of it; raises ``Retry`` when that
        cannot be recorded now."""
        close_old_connections()
        try:
            payloads = decode(msg.value())
        except ValueError as exc:
            logger.error(
                "undecodable Kafka message %s[%d]@%d (%s): copied to the dead-letter topic",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                exc,
            )
            self._dead(msg, f"undecodable: {exc}")
            metrics.UNDECODABLE.inc()
            return
        self._starts = 1
        ours = self._again.get((msg.partition(), msg.offset()))
        starts = ours if ours is not None else self._count_start(msg)
        self._starts = starts
        if starts > int(settings.DELIVERY_LIMIT):
            self._crashed(msg, payloads, starts)
            return
        if starts > 1 and len(payloads) > 1:
            self._split(payloads, crashes=starts - 1)
            return
        if starts > 1:
            self._deliver_in_sandbox(msg, payloads)
        else:
            self._deliver(payloads)
        self.failures = 0

    def _count_start(self, msg: Any) -> int:
        try:
            starts = began(msg.topic(), msg.partition(), msg.offset(), timestamp(msg))
        except Exception as exc:
            self.failures += 1
            raise Retry(_backoff(self.failures), f"its start not counted ({exc!r})") from exc
        # A single split from a replayed batch goes on counting where the batch stopped,
        # so a poison notification is failed after DELIVERY_LIMIT crashes, not one more.
        return starts + crashes_before(msg)

    def _deliver_in_sandbox(self, msg: Any, payloads: list[dict[str, Any]]) -> None:
        """A replayed single message, in a process of its own (``sandbox``): when it
        crashes again, this consumer counts the crash and goes on, with no rebalance.
        Tries until the delivery limit, or hands the partition back to polling (the
        message read again, its count kept) after half the poll bound."""
        from . import sandbox

        deadline = time.monotonic() + poll_bound() / 2
        while True:
            try:
                outcomes = sandbox.deliver(payloads, budget=float(settings.KAFKA_BUDGET))
            except sandbox.Failed as exc:
                self.failures += 1
                self._requeue(payloads, _backoff(self.failures), why=str(exc))
                return
            except sandbox.Crashed as exc:
                metrics.SANDBOX_CRASHES.inc()
                self._starts = self._count_start(msg)
                logger.warning(
                    "Kafka message %s[%d]@%d: %s (start %d of at most %d)",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    exc,
                    self._starts,
                    int(settings.DELIVERY_LIMIT),
                )
                if self._starts > int(settings.DELIVERY_LIMIT):
                    self._crashed(msg, payloads, self._starts)
                    return
                if time.monotonic() > deadline or self.stopping.wait(0.2):
                    raise Retry(0.0, "its delivery keeps crashing") from exc
            else:
                self._retry_later(payloads, outcomes)
                return

    def _deliver(self, payloads: list[dict[str, Any]]) -> None:
        from . import delivery
        from .tasks import INFRASTRUCTURE_ERRORS, _cause

        try:
            outcomes = delivery.deliver_many(payloads, budget=float(settings.KAFKA_BUDGET))
        except INFRASTRUCTURE_ERRORS as exc:
            metrics.batch_retries[_cause(exc)].inc()
            self.failures += 1
            self._requeue(payloads, _backoff(self.failures), why=repr(exc))
            return
        self._retry_later(payloads, outcomes)

    def _retry_later(self, payloads: list[dict[str, Any]], outcomes: list[Any]) -> None:
        again = [(p, o) for p, o in zip(payloads, outcomes, strict=True) if o.status == "retry"]
        if again:
            self._requeue([p for p, _ in again], max(o.retry_in for _, o in again) + random.uniform(0, 0.5))

    def _requeue(self, payloads: list[dict[str, Any]], delay: float, why: str = "") -> None:
        """Their retry as due outbox rows; if the database will not take them either, the
        message itself is tried again after ``delay`` (uncommitted)."""
        from . import delivery

        if why:
            logger.warning(
                "%d notification(s), e.g. %s: %s, retrying in %.1fs", len(payloads), payloads[0]["key"], why, delay
            )

        try:
            delivery.requeue_through_outbox(payloads, due_in=delay)
        except Exception as exc:
            raise Retry(delay, f"its retry not queued in the outbox ({exc!r})") from exc

    def _split(self, payloads: list[dict[str, Any]], crashes: int) -> None:
        """A replayed batch: one message per notification, so that only a poison one
        reaches the delivery limit; each carries the batch's ``crashes`` on."""
        from . import deadletters

        try:
            refused = kafka.publish_deliveries(payloads, per_message=1, crashes=crashes)
        except Exception as exc:
            logger.warning("replayed batch of %d not split (%r): through the outbox", len(payloads), exc)
            self._requeue(payloads, 0.0)
            return
        by_key = {p["key"]: p for p in payloads}
        for r in refused:
            deadletters.fail(by_key[r.key], f"failed: {r.reason}", crashed=True, category="oversized")
        logger.warning("replayed batch of %d split into single messages", len(payloads))
        metrics.BATCHES_SPLIT.inc()

    def _crashed(self, msg: Any, payloads: list[dict[str, Any]], starts: int) -> None:
        from . import deadletters

        why = (
            f"dead-lettered: delivery crashed its worker {starts - 1} times "
            f"(NOTIFICATIONS_DELIVERY_LIMIT={settings.DELIVERY_LIMIT})"
        )
        from .models import FINISHED_STATUSES, Notification

        try:
            for payload in payloads:
                deadletters.fail(payload, why, crashed=True, category="crashed_worker")
            keys = [p["key"] for p in payloads]
            held = Notification.objects.filter(key__in=keys).exclude(status__in=FINISHED_STATUSES).exists()
        except Exception as exc:
            raise Retry(_backoff(self.failures + 1), f"its failure not recorded ({exc!r})") from exc
        if held:
            # A claim of the worker that died is live until its lease ends: fail it then.
            raise Retry(float(settings.CLAIM_LEASE) / 2, "a dead worker's claim is still live")
        self._dead(msg, why)

    def _dead(self, msg: Any, reason: str) -> None:
        headers = [
            ("source", f"{msg.topic()}[{msg.partition()}]@{msg.offset()}".encode()),
            ("reason", reason.encode()[:1000]),
        ]
        try:
            # Keyed by its source partition: the copies of one partition stay in order.
            kafka.publish_dead(msg.value(), headers, key=f"{msg.topic()}[{msg.partition()}]".encode())
        except Exception as exc:
            raise Retry(_backoff(self.failures + 1), f"not copied to the dead-letter topic ({exc!r})") from exc


def _numbers(partitions: list[Any]) -> list[int]:
    return sorted(tp.partition for tp in partitions)


def start() -> list[DeliveryConsumer]:
    """Start this process's consumers (once per process: a forked pool process starts
    its own), high priority first."""
    global _started_in
    if not kafka.enabled() or _started_in == os.getpid():
        return _consumers
    _consumers.clear()
    _started_in = os.getpid()
    for topic in kafka.delivery_topics():
        consumer = DeliveryConsumer(topic)
        consumer.start()
        _consumers.append(consumer)
    logger.info("Kafka consumers started in process %d: %s", os.getpid(), ", ".join(kafka.delivery_topics()))
    return _consumers


def stop(timeout: float = 10.0) -> None:
    """Stop this process's consumers once their current message is done, leaving the
    group so that their partitions move to others without waiting for the session."""
    global _started_in
    if _started_in != os.getpid():
        return
    for consumer in _consumers:
        consumer.stopping.set()
    deadline = time.monotonic() + timeout
    for consumer in _consumers:
        consumer.join(max(0.0, deadline - time.monotonic()))
    _consumers.clear()
    _started_in = None


def connect_signals() -> None:
    """Run the consumers in every worker process: in each prefork pool process, or in
    the worker itself with the solo and thread pools."""
    from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

    def in_child(**kwargs: Any) -> None:
        start()

    def in_worker(sender: Any = None, **kwargs: Any) -> None:
        pool = type(getattr(sender, "pool", None)).__module__
        if not pool.endswith(".prefork"):  # prefork pool processes start their own
            start()

    worker_process_init.connect(in_child, weak=False, dispatch_uid="notifications.streams.child")
    worker_process_shutdown.connect(lambda **kw: stop(), weak=False, dispatch_uid="notifications.streams.child_stop")
    worker_ready.connect(in_worker, weak=False, dispatch_uid="notifications.streams.worker")
    worker_shutdown.connect(lambda **kw: stop(), weak=False, dispatch_uid="notifications.streams.worker_stop")
