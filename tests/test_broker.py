"""The broker side: durable quorum topology with a dead-letter bound, and publishes that
fail loudly (confirm + mandatory) instead of losing a message."""

from __future__ import annotations

from typing import Any

import pytest
from amqp.exceptions import ChannelError
from celery import Celery, current_app
from kombu import Exchange, Queue

from notifications import broker, notify
from notifications.broker import configure
from notifications.models import OutboxMessage
from notifications.relay import relay_batch
from tests.conftest import notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def declare_passive(name: str):
    with current_app.connection_for_write() as conn:
        return conn.default_channel.queue_declare(queue=name, passive=True)


@pytest.fixture
def no_wakeups(settings):
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False


def test_unroutable_publish_raises_and_leaves_the_row_unpublished(no_wakeups):
    first = notify(**notification_kwargs())
    assert relay_batch() == 1  # declares the queue on this connection (and caches that)
    with current_app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue="notifications.deliver")

    lost = notify(**notification_kwargs())
    with pytest.raises(ChannelError, match="NO_ROUTE"):
        relay_batch()
    assert OutboxMessage.objects.get(notification=lost).published_at is None
    assert OutboxMessage.objects.get(notification=first).published_at is not None

    # The failed connection was dropped; the next pass declares the queue again.
    assert relay_batch() == 1
    assert OutboxMessage.objects.get(notification=lost).published_at is not None
    assert declare_passive("notifications.deliver").message_count == 1


def test_delivery_queue_is_a_durable_quorum_queue_with_a_dead_letter_bound(no_wakeups):
    notify(**notification_kwargs())
    relay_batch()
    import json
    import subprocess

    from tests.settings import VHOST

    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            VHOST,
            "name",
            "type",
            "durable",
            "arguments",
            "--formatter",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    queues = {q["name"]: q for q in json.loads(out)}
    deliver = queues["notifications.deliver"]
    assert deliver["type"] == "quorum" and deliver["durable"] is True
    arguments = json.dumps(deliver["arguments"])
    assert '"x-delivery-limit"' in arguments and '"notifications.dead"' in arguments
    assert queues["notifications.dead"]["type"] == "quorum"


# What configure() changes in a calling service's Celery app. Finding guarded here:
# configure() took over the app's default queue, exchange and routing key, so the
# service's own unrouted tasks landed on notifications.deliver, where the notification
# service's workers rejected them as unregistered and dead-lettered them.


def service_app(**conf: Any) -> Celery:
    """A calling service's Celery app on this run's vhost, configured with configure()."""
    from django.conf import settings

    app = Celery("billing", set_as_current=False)
    app.conf.update(broker_url=settings.CELERY_BROKER_URL, task_serializer="json", **conf)
    configure(app, maintenance=False)

    @app.task(name="billing.send_invoice", shared=False)
    def send_invoice(number: int) -> int:
        return number

    return app


def route(app: Celery, task: str) -> tuple[str, str, str]:
    """(queue, exchange, routing key) a task of that name is published to."""
    options = app.amqp.router.route({}, task)
    queue = options["queue"]
    return queue.name, queue.exchange.name, options.get("routing_key") or queue.routing_key


def test_an_unrelated_task_keeps_going_to_the_apps_default_queue() -> None:
    """Finding: configure() took over the calling service's default queue."""
    app = service_app()
    assert route(app, "billing.send_invoice") == ("celery", "celery", "celery")
    assert (app.conf.task_default_queue, app.conf.task_default_exchange) == ("celery", "celery")
    assert app.conf.task_default_exchange_type == "direct"
    assert app.conf.task_default_routing_key == "celery"


def test_the_pipelines_tasks_still_go_to_its_queues() -> None:
    """Finding: configure() took over the calling service's default queue; the pipeline's
    own tasks are routed by name instead, to the same queues as before."""
    app = service_app()
    deliver = ("notifications.deliver", "notifications", "notifications.deliver")
    relay = ("notifications.relay", "notifications", "notifications.relay")
    assert route(app, broker.DELIVER_MANY_TASK) == deliver
    assert route(app, broker.DELIVER_TASK) == deliver
    for task in (broker.RELAY_TASK, broker.RECOVER_TASK, broker.DEAD_LETTERS_TASK, broker.PURGE_TASK):
        assert route(app, task) == relay, task
    # Beat sends its entries by task name, so they take the same routes.
    assert app.conf.beat_schedule["notifications-relay"]["task"] == broker.RELAY_TASK


def test_a_worker_without_queues_named_still_consumes_the_default_queue() -> None:
    """Finding: configure() took over the calling service's default queue. It sets
    task_queues, so the app's default queue joins them: ``celery -A app worker`` without
    ``-Q`` consumes it as before, besides the pipeline's queues."""
    app = service_app()
    assert sorted(app.amqp.queues) == [
        "celery",
        "notifications.deliver",
        "notifications.deliver.high",
        "notifications.relay",
    ]
    named = service_app(task_default_queue="billing")
    assert sorted(named.amqp.queues) == [
        "billing",
        "notifications.deliver",
        "notifications.deliver.high",
        "notifications.relay",
    ]
    assert route(named, "billing.send_invoice") == ("billing", "billing", "billing")


def test_an_apps_own_queues_and_routes_are_kept() -> None:
    mine = Queue("billing.mail", Exchange("billing", type="direct"), routing_key="mail")
    app = service_app(task_queues=[mine], task_routes={"billing.*": {"queue": "billing.mail"}})
    assert sorted(app.amqp.queues) == [
        "billing.mail",
        "notifications.deliver",
        "notifications.deliver.high",
        "notifications.relay",
    ]
    assert route(app, "billing.send_invoice") == ("billing.mail", "billing", "mail")
    assert route(app, broker.DELIVER_MANY_TASK)[0] == "notifications.deliver"

    def router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        return {"queue": "billing.mail"}  # claims every task: the pipeline's routes come first

    routed = service_app(task_queues=[mine], task_routes=[router])
    assert route(routed, "billing.send_invoice")[0] == "billing.mail"
    assert route(routed, broker.DELIVER_MANY_TASK)[0] == "notifications.deliver"
    assert route(routed, broker.RELAY_TASK)[0] == "notifications.relay"


def test_an_unrelated_task_is_published_to_the_apps_default_queue() -> None:
    """Finding: configure() took over the calling service's default queue, so its own
    task was published to notifications.deliver. Published for real, it is in the app's
    default queue and not in the delivery queue."""
    app = service_app()
    deliver = next(q for q in broker.queues() if q.name == "notifications.deliver")
    with current_app.connection_for_write() as conn:
        deliver.bind(conn.default_channel).declare()  # as the relay declares it
        before = declare_passive("notifications.deliver").message_count
    try:
        app.tasks["billing.send_invoice"].delay(17)
        assert declare_passive("celery").message_count == 1
        assert declare_passive("notifications.deliver").message_count == before
    finally:
        with current_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue="celery")  # workers of later tests consume it
        app.close()


def test_the_project_routes_celerys_result_cleanup_to_its_relay_queue() -> None:
    """Finding: configure() took over the default queue, and the project's one task of its
    own (beat's daily result cleanup) relied on it to reach the workers; it is routed to
    the relay queue the project's workers consume."""
    assert route(current_app, "celery.backend_cleanup") == (
        "notifications.relay",
        "notifications",
        "notifications.relay",
    )
    assert route(current_app, broker.DELIVER_MANY_TASK)[0] == "notifications.deliver"


def test_beats_result_cleanup_reaches_a_worker_on_the_pipelines_queues(workers: Any) -> None:
    """Finding: configure() took over the default queue, and beat's daily result cleanup
    reached the workers only through it. Sent as beat sends it, by name, it is run by a
    worker consuming only notifications.deliver and notifications.relay (as
    docker-compose.yml, devstack and the chaos run start them): expired results go."""
    from datetime import timedelta

    from django.utils import timezone
    from django_celery_results.models import TaskResult

    expired = TaskResult.objects.create(task_id="expired-result", status="SUCCESS", result="null")
    TaskResult.objects.filter(pk=expired.pk).update(date_done=timezone.now() - timedelta(days=8))
    fresh = TaskResult.objects.create(task_id="fresh-result", status="SUCCESS", result="null")
    workers.start(concurrency=1, queues="notifications.deliver,notifications.relay")
    current_app.send_task("celery.backend_cleanup")
    wait_for(lambda: not TaskResult.objects.filter(pk=expired.pk).exists(), timeout=30, what="expired result deleted")
    assert TaskResult.objects.filter(pk=fresh.pk).exists()
