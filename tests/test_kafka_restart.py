"""A Kafka broker that lost its log (Tansu, memory storage, restarted): the producer's
identity is gone with it, and the relay and the dead-letter copies must go on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from django.test import override_settings

from notifications import kafka, notify, relay
from notifications.models import Notification, OutboxMessage
from project import kafkabroker
from tests.conftest import kafka_settings, notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def own_broker(settings, kafka_topics: dict[str, str]) -> Iterator[kafkabroker.Broker]:
    """A Tansu broker of this test's own (it is restarted), with the delivery path on it."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    with (
        kafkabroker.start(engine="tansu") as broker,
        override_settings(**kafka_settings(broker.bootstrap, kafka_topics)),
    ):
        kafka._reset()
        yield broker
    kafka._reset()


def test_publishing_goes_on_after_the_broker_lost_its_log(own_broker: kafkabroker.Broker) -> None:
    """Kafka fault run: after Tansu's restart every delivery report of the idempotent
    producer came back PRODUCER_FENCED (the broker no longer knew its producer id),
    which librdkafka does not count as fatal; the producer was kept, and every relay
    pass and dead-letter copy after it failed until the worker was restarted."""
    first = notify(**notification_kwargs())
    assert relay.drain() == 1
    kafka.publish_dead(b"before", [("reason", b"test")])
    own_broker.restart()
    after = [notify(**notification_kwargs(user_id=f"u{i}")) for i in range(3)]

    def published() -> bool:
        try:
            relay.drain(budget=5)
        except kafka.PublishError:
            pass  # the pass that meets the lost producer id fails; its rows stay
        return not OutboxMessage.objects.filter(published_at__isnull=True).exists()

    wait_for(published, timeout=60, what="the rows published after the restart")
    assert Notification.objects.filter(pk__in=[n.pk for n in after], published_at__isnull=False).count() == 3
    assert Notification.objects.get(pk=first.pk).status == "published"

    def dead_copied() -> bool:
        try:
            kafka.publish_dead(b"after " + uuid.uuid4().hex.encode(), [("reason", b"test")])
        except kafka.PublishError:
            return False
        return True

    wait_for(dead_copied, timeout=30, what="a dead-letter copy after the restart")


def test_after_the_broker_lost_its_log_the_topics_come_back_whole_and_are_read(
    own_broker: kafkabroker.Broker, settings
) -> None:
    """Kafka fault run: after Tansu's restart the producer's first metadata request for
    the delivery topic created it with Tansu's default of 4 partitions, not
    NOTIFICATIONS_KAFKA_PARTITIONS (12): every user went to a third of the partitions,
    and the drain after the faults took minutes behind one slow partition. The topics
    are created again by the pipeline, with its partition count, and a consumer that
    lived through the restart reads them."""
    from confluent_kafka.admin import AdminClient
    from django.core import mail

    from notifications import streams

    def publish() -> bool:
        try:
            relay.drain(budget=5)
        except kafka.PublishError:
            pass  # the pass that meets the lost producer id (or the missing topic) fails
        return not OutboxMessage.objects.filter(published_at__isnull=True).exists()

    kafka.ensure_topics()
    consumer = streams.DeliveryConsumer(settings.NOTIFICATIONS_KAFKA_TOPIC)
    consumer.start()
    try:
        first = notify(**notification_kwargs())
        wait_for(publish, timeout=30, what="the row published before the restart")
        wait_for(lambda: Notification.objects.filter(pk=first.pk, status="sent").exists(), timeout=60)
        own_broker.restart()
        after = [notify(**notification_kwargs(user_id=f"u{i}")) for i in range(6)]
        wait_for(publish, timeout=60, what="the rows published after the restart")
        wait_for(
            lambda: Notification.objects.filter(pk__in=[n.pk for n in after], status="sent").count() == 6,
            timeout=90,
            what=lambda: list(Notification.objects.filter(pk__in=[n.pk for n in after]).values("key", "status")),
        )
    finally:
        consumer.stopping.set()
        consumer.join(15)
    meta = AdminClient({"bootstrap.servers": own_broker.bootstrap}).list_topics(timeout=10)
    names = [*kafka.delivery_topics(), settings.NOTIFICATIONS_KAFKA_DEAD_TOPIC]
    assert {name: len(meta.topics[name].partitions) for name in names} == dict.fromkeys(names, 12)
    assert sorted(m.extra_headers["X-Notification-Key"] for m in mail.outbox) == sorted(n.key for n in [first, *after])
