"""The worker's consumer: Celery's own, except for how it sets up native delayed delivery.

Celery (5.5+) declares the exchanges and queues of native delayed delivery, which a
retry's countdown rides on with quorum queues, each time the consumer connects: once
for every URL in ``broker_url``, retrying an unreachable one for about ten seconds, and
the worker takes no message meanwhile. The ';'-separated URLs of a RabbitMQ cluster are
one broker whose nodes share exchanges, queues and bindings, so with one node down every
worker that reconnected stood still that long. This consumer declares them once, through
a connection that fails over between the URLs as the worker's own connection does.

``notifications.broker.configure()`` makes it the app's ``worker_consumer``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery as CeleryDelayedDelivery
from kombu.common import Broadcast
from kombu.exceptions import OperationalError
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)
from kombu.utils.functional import retry_over_time

logger = logging.getLogger(__name__)

CELERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
STEP = f"{__name__}:DelayedDelivery"
RETRIES = 3  # as Celery's step; each attempt tries every URL once


class DelayedDelivery(CeleryDelayedDelivery):
    """Declare the delayed-delivery topology once per consumer start, on whichever node
    of the cluster answers first. A failure is logged, never fatal: the topology is
    durable, so what an earlier start declared still carries the retries."""

    def start(self, c: Any) -> None:
        app = c.app
        self._validate_configuration(app)  # type: ignore[attr-defined]  # a misconfiguration stops the worker
        try:
            retry_over_time(
                self._declare,
                args=(app,),
                catch=(OSError, OperationalError, *app.connection_for_write().connection_errors),
                errback=self._on_retry,  # type: ignore[attr-defined]  # Celery's log line
                interval_start=1.0,
                interval_step=1.0,
                max_retries=RETRIES,
            )
        except Exception as exc:
            logger.warning("native delayed delivery not set up on connect: %r", exc)

    def _declare(self, app: Any) -> None:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=max(len(conn.alt), 1) - 1, interval_start=0)
            declare_native_delayed_delivery_exchanges_and_queues(
                conn, app.conf.broker_native_delayed_delivery_queue_type
            )
            for queue in app.amqp.queues.values():
                if not isinstance(queue, Broadcast):
                    bind_queue_to_native_delayed_delivery_exchange(conn, queue)


class Consumer(CeleryConsumer):
    """Celery's consumer with ``DelayedDelivery`` above in place of Celery's step."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[valid-type,misc]  # the stubs miss it
        default_steps = [STEP if step == CELERY_STEP else step for step in CeleryConsumer.Blueprint.default_steps]
