"""Where the metrics are read: the web process's ``/metrics``, and the small exposition
server a worker or beat runs in its main process.

``/metrics`` (``metrics_view``) serves this process's counters and, computed at scrape
time, the gauges of the whole pipeline: the figures of ``notifications.status`` (the
same ones the admin dashboard and ``manage.py notifications status`` show: counts by
status, bounded as the dashboard's are, the outbox backlog and what waits for later)
and the depth and consumers of the broker queues (both delivery queues among them),
read with a passive declare under a short deadline, so a scrape never hangs on a broker
that is away (``notifications_broker_up 0``). With ``NOTIFICATIONS_BROKER=kafka`` the
delivery "queues" are the Kafka topics, their depth the consumer group's lag. Only the
web process asks: workers never query for gauges.

A worker (or beat) with ``NOTIFICATIONS_METRICS_PORT`` serves its counters on that port
(``NOTIFICATIONS_METRICS_ADDRESS``, 127.0.0.1 by default) from its main process. Its
tasks run in pool processes, so it needs ``PROMETHEUS_MULTIPROC_DIR``: one empty
directory per worker (and one for beat, if beat has one), which the main process clears
of other processes' files when the worker starts, and whose files it adds up on each
scrape. A pool process that exits is marked dead (``mark_process_dead``); its counts
stay in the totals, as a counter's must.

Both answer whom ``notifications.access`` admits (a loopback caller no proxy forwarded, a
caller with ``NOTIFICATIONS_OPS_TOKEN`` as a bearer token or basic-auth password, and on
``/metrics`` a logged-in staff user); 401 (or 403 for a user who is not staff) otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import access, metrics, status
from .conf import settings

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)

BROKER_TIMEOUT = 2.0  # seconds a scrape waits for the broker's answers
# A status with more notifications gets PostgreSQL's estimate: an exact count of a
# million rows on every scrape would cost 60 to 250 ms of database time (with and
# without a fresh visibility map), the bounded count under 10.
EXACT_COUNTS_UP_TO = status.EXACT_UP_TO

# Access ------------------------------------------------------------------------------


def _refusal(request: HttpRequest) -> HttpResponse | None:
    from django.db import DatabaseError
    from django.http import HttpResponse

    if access.allowed(request):
        return None
    try:
        user = getattr(request, "user", None)
        authenticated = bool(user is not None and user.is_authenticated)
    except DatabaseError:  # the session cannot be read: no user
        authenticated = False
    if authenticated:
        return HttpResponse("Metrics are for staff users.\n", status=403, content_type="text/plain")
    response = HttpResponse(
        "Metrics need NOTIFICATIONS_OPS_TOKEN (bearer or basic auth), a staff login, or a loopback caller.\n",
        status=401,
        content_type="text/plain",
    )
    response["WWW-Authenticate"] = 'Bearer realm="metrics", Basic realm="metrics"'
    return response


# The web process's /metrics ------------------------------------------------------------


def process_registry() -> Any:
    """This process's counters: the default registry, or, in multiprocess mode (a web
    server with several processes), the sum over the directory's files."""
    path = metrics.multiprocess_dir()
    if not path:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


class _Scrape(Collector):
    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def collect(self) -> Iterable[Metric]:
        for part in self.parts:
            yield from part.collect()


def metrics_view(request: HttpRequest) -> HttpResponse:
    """``/metrics``: this process's counters and the pipeline's gauges, in the format the
    scraper asks for (Prometheus text or OpenMetrics); see the module docstring for who
    may read them."""
    from django.http import HttpResponse
    from django.utils.cache import add_never_cache_headers

    refused = _refusal(request)
    if refused is not None:
        return refused
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encoder(_Scrape(process_registry(), PipelineCollector())), content_type=content_type)
    add_never_cache_headers(response)
    return response


class PipelineCollector(Collector):
    """The gauges read at scrape time: the database's figures through
    ``notifications.status``, the broker's queues through passive declares."""

    def __init__(
        self, app: Any = None, using: str | None = None, timeout: float = BROKER_TIMEOUT, broker_url: str | None = None
    ) -> None:
        self.app = app  # the Celery app whose broker to ask (the current one by default)
        self.using = using
        self.timeout = timeout
        self.broker_url = broker_url  # another URL than the app's (a cluster node, say)

    def collect(self) -> Iterator[Metric]:
        yield from self._database()
        yield from self._broker()

    def _database(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("notifications_database_up", "1 if the scrape could read the pipeline's tables.")
        try:
            counted = status.counts_by_status_bounded(EXACT_COUNTS_UP_TO, self.using)
            backlog = status.backlog(self.using)
            scheduled = status.scheduled(self.using)
            held = status.held_count(self.using)
            stuck = status.stuck_claims(self.using)
        except Exception as exc:
            logger.warning("metrics: the database cannot be read: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_status = GaugeMetricFamily(
            "notifications_by_status",
            f"Notifications in each status: exact up to {EXACT_COUNTS_UP_TO}, PostgreSQL's estimate above "
            "(see notifications_by_status_estimated).",
            labels=["status"],
        )
        estimated = GaugeMetricFamily(
            "notifications_by_status_estimated",
            "1 if notifications_by_status of this status is PostgreSQL's estimate (too many rows to count).",
            labels=["status"],
        )
        for name, count in sorted(counted.counts.items()):
            by_status.add_metric([name], count)
            estimated.add_metric([name], 1 if name in counted.estimated else 0)
        yield by_status
        yield estimated
        rows = GaugeMetricFamily(
            "notifications_outbox_backlog_rows",
            "Unpublished outbox rows: due now (waiting for the relay) and scheduled (retries due later).",
            labels=["state"],
        )
        rows.add_metric(["due"], backlog.due)
        rows.add_metric(["scheduled"], backlog.scheduled)
        yield rows
        waiting = GaugeMetricFamily(
            "notifications_scheduled_waiting",
            "Outbox rows due later (sends scheduled with send_at, retries in their backoff), by priority.",
            labels=["priority"],
        )
        for priority, count in sorted(scheduled.by_priority.items()):
            waiting.add_metric([priority], count)
        yield waiting
        next_due = GaugeMetricFamily(
            "notifications_scheduled_next_due_seconds",
            "Seconds until the first outbox row due later falls due (no sample when none waits).",
        )
        if scheduled.next_due_in is not None:
            next_due.add_metric([], scheduled.next_due_in)
        yield next_due
        yield GaugeMetricFamily(
            "notifications_outbox_oldest_due_age_seconds",
            "Age of the oldest due, unpublished outbox row (0 when there is none).",
            value=backlog.oldest_due_age or 0.0,
        )
        yield GaugeMetricFamily(
            "notifications_held_ambiguous", "Ambiguous notifications held for a person to decide.", value=held
        )
        yield GaugeMetricFamily(
            "notifications_stuck_claims",
            "Claims whose lease ran out: their worker died, is paused or cut off.",
            value=stuck,
        )

    def _broker(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("notifications_broker_up", "1 if the scrape could read the broker's queues.")
        found = broker_queues(self.app, self.timeout, self.broker_url)
        up.add_metric([], 0 if found is None else 1)
        yield up
        if found is None:
            return
        depth = GaugeMetricFamily(
            "notifications_queue_messages",
            "Messages ready in a queue of the pipeline (not counting those workers hold unacked); with Kafka, "
            "a delivery topic's consumer lag (less the message in progress per partition).",
            labels=["queue", "role"],
        )
        consumers = GaugeMetricFamily(
            "notifications_queue_consumers",
            "Consumers of a queue of the pipeline (with Kafka, of a delivery topic: the group's members assigned "
            "a partition of it).",
            labels=["queue", "role"],
        )
        for role, (name, ready, consuming) in found.items():
            depth.add_metric([name, role], ready)
            consumers.add_metric([name, role], consuming)
        yield depth
        yield consumers


DELIVERY_ROLES = ("deliver_high", "deliver")


def queue_roles() -> dict[str, str]:
    """role -> queue (or topic) name, for the queues a scrape reads (a bounded set of
    names). With Kafka the delivery roles are its topics, and Celery's broker carries
    the relay queue only: deliveries have no dead-letter or parked queue there."""
    if settings.BROKER == "kafka":
        return {
            "deliver_high": settings.KAFKA_HIGH_TOPIC,
            "deliver": settings.KAFKA_TOPIC,
            "relay": settings.RELAY_QUEUE,
        }
    return {
        "deliver_high": settings.HIGH_QUEUE,
        "deliver": settings.DELIVER_QUEUE,
        "relay": settings.RELAY_QUEUE,
        "dead_letter": settings.DEAD_LETTER_QUEUE,
        "parked": settings.PARKED_QUEUE,
    }


def broker_queues(
    app: Any = None, timeout: float = BROKER_TIMEOUT, url: str | None = None
) -> dict[str, tuple[str, int, int]] | None:
    """role -> (queue, ready messages, consumers), or None if the broker did not answer
    within ``timeout`` seconds. A queue nobody declared yet counts as empty, unconsumed.
    With ``NOTIFICATIONS_BROKER=kafka`` a delivery topic's "ready" is its consumer lag
    (``kafka.lag_by_topic``: published, not yet committed by the group, less the message
    in progress per partition) and its consumers the group's members assigned to it; a
    Kafka or a Celery broker that does not answer makes it None.

    The passive declares run on a connection of their own in a thread that is waited
    for at most ``timeout``: a broker that accepts the connection and then says nothing
    cannot hold the scrape (the thread ends at its own socket timeouts)."""
    from celery import current_app

    app = app or current_app
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            if settings.BROKER == "kafka":
                result["queues"] = _kafka_queues(app, timeout, url)
            else:
                result["queues"] = _declare_passively(app, timeout, url, queue_roles())
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=ask, name="notifications-metrics-broker", daemon=True)
    thread.start()
    thread.join(timeout)
    if "queues" not in result:
        logger.warning("metrics: the broker did not answer: %r", result.get("error", f"no answer in {timeout}s"))
        return None
    return dict(result["queues"])


def _kafka_queues(app: Any, timeout: float, url: str | None) -> dict[str, tuple[str, int, int]]:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from . import kafka

    roles = queue_roles()
    topics = {roles[role]: role for role in DELIVERY_ROLES}
    lag = kafka.lag_by_topic()  # raises if Kafka does not answer
    client = AdminClient(kafka.client_config())
    [described] = client.describe_consumer_groups([str(settings.KAFKA_GROUP)], request_timeout=timeout).values()
    consumers = dict.fromkeys(topics, 0)
    try:
        members = described.result(timeout=timeout).members
    except KafkaException as exc:  # a group no consumer ever joined, on some brokers
        logger.debug("metrics: the Kafka group was not described: %r", exc)
        members = []
    for member in members:
        assigned = member.assignment.topic_partitions if member.assignment else []
        for topic in {tp.topic for tp in assigned} & set(topics):
            consumers[topic] += 1
    found = {role: (topic, int(lag.get(topic, 0)), consumers[topic]) for topic, role in topics.items()}
    found.update(_declare_passively(app, timeout, url, {r: n for r, n in roles.items() if r not in DELIVERY_ROLES}))
    return found


def _declare_passively(
    app: Any, timeout: float, url: str | None, roles: dict[str, str]
) -> dict[str, tuple[str, int, int]]:
    from amqp.exceptions import NotFound

    found: dict[str, tuple[str, int, int]] = {}
    options = {"read_timeout": timeout, "write_timeout": timeout}
    with app.connection_for_read(url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        channel = conn.channel()
        try:
            for role, name in roles.items():
                try:
                    declared = channel.queue_declare(queue=name, passive=True)
                except NotFound:  # and the broker closed the channel
                    found[role] = (name, 0, 0)
                    channel = conn.channel()
                    continue
                found[role] = (name, int(declared.message_count), int(declared.consumer_count))
        finally:
            try:
                channel.close()
            except Exception:
                pass
    return found


# A worker's or beat's exposition server -------------------------------------------------


class _Exporter:
    """The exposition server of this process (one at most)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server: Any = None
        self.pid = 0

    def start(self, role: str) -> Any:
        """At a worker's (or beat's) start, before any pool process forks: clear the
        multiprocess directory of earlier processes' files, then serve, if a port is set."""
        port = settings.METRICS_PORT
        with self.lock:
            if self.server is not None and self.pid == os.getpid():
                return self.server
            path = metrics.multiprocess_dir()
            if path:
                removed = clear_multiprocess_dir(path, keep_pid=os.getpid())
                if removed:
                    logger.info("metrics: removed %d file(s) of earlier processes from %s", removed, path)
            if port in (None, ""):
                return None
            if not path and role == "worker":
                logger.warning(
                    "metrics: NOTIFICATIONS_METRICS_PORT is set without PROMETHEUS_MULTIPROC_DIR; the counts of "
                    "this worker's pool processes cannot be served (set it to an empty directory of its own)"
                )
            address = str(settings.METRICS_ADDRESS or "127.0.0.1")
            try:
                self.server = serve(address, int(port), _guard(_wsgi_app()))
            except OSError as exc:  # a busy port must not stop the worker: it still delivers
                logger.error("metrics: cannot serve on %s:%s: %s", address, port, exc)
                return None
            self.pid = os.getpid()
            logger.info("metrics: %s serving on http://%s:%s/metrics", role, address, self.server.server_port)
            return self.server

    def stop(self) -> None:
        with self.lock:
            if self.server is not None and self.pid == os.getpid():
                self.server.shutdown()
                self.server.server_close()
            self.server = None


exporter = _Exporter()


def clear_multiprocess_dir(path: str, keep_pid: int) -> int:
    """Remove the files of every process but ``keep_pid`` (this one, whose files are open)
    from the multiprocess directory; return how many. Run before a worker forks its pool."""
    removed = 0
    for name in os.listdir(path):
        if name.endswith(".db") and name[:-3].rsplit("_", 1)[-1] != str(keep_pid):
            try:
                os.remove(os.path.join(path, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _wsgi_app() -> Callable[..., Any]:
    from prometheus_client import make_wsgi_app

    return make_wsgi_app(process_registry())  # type: ignore[no-any-return]


def _guard(app: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not access.trusted(environ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics", Basic realm="metrics"')],
            )
            return [b"Metrics need NOTIFICATIONS_OPS_TOKEN (bearer or basic auth), or a loopback caller.\n"]
        return app(environ, start_response)

    return guarded


def serve(address: str, port: int, app: Callable[..., Any]) -> Any:
    """Serve ``app`` on ``address:port`` from a daemon thread; return the server."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # a line per scrape is noise
            pass

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    server = make_server(address.strip("[]"), port, app, Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="notifications-metrics", daemon=True).start()
    return server


# Celery signals (connected by broker.configure) -----------------------------------------


def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    exporter.start("worker")


def on_beat_init(sender: Any = None, **kwargs: Any) -> None:
    exporter.start("beat")


def on_worker_process_shutdown(pid: int | None = None, **kwargs: Any) -> None:
    """A pool process is exiting: its live gauges go, its counters stay in the totals."""
    if metrics.multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def connect_signals() -> None:
    from celery.signals import beat_init, worker_init, worker_process_shutdown

    worker_init.connect(on_worker_init, weak=False, dispatch_uid="notifications.metrics.worker")
    beat_init.connect(on_beat_init, weak=False, dispatch_uid="notifications.metrics.beat")
    worker_process_shutdown.connect(
        on_worker_process_shutdown, weak=False, dispatch_uid="notifications.metrics.process_shutdown"
    )
