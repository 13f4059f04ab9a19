"""Health probes and their views: ``/healthz`` says the web process is alive,
``/readyz`` whether PostgreSQL, Redis and the brokers answer within a timeout: Celery's
(``CELERY_BROKER_URL``, which carries the relay wake-ups and beat's tasks with either
delivery broker) and, with ``NOTIFICATIONS_BROKER=kafka``, the Kafka cluster.

Mount them in a service's urls (``path("", include("notifications.health"))``), or
route the two views yourself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from . import access
from .conf import settings

Probe = Callable[[float], None]


def check_postgresql(timeout: float) -> None:
    """``SELECT 1`` on the app's database, over a new connection (closed after), so the
    answer is about the server now and not about a connection opened earlier."""
    from django.db import connections

    connection = connections[settings.DATABASE]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()


def check_redis(timeout: float) -> None:
    """``PING`` on ``NOTIFICATIONS_REDIS_URL``."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def check_rabbitmq(timeout: float, url: str | None = None) -> None:
    """Open a connection to the Celery app's broker, or to ``url`` (each node of a
    cluster's URL list once, until one answers), and close it."""
    from celery import current_app

    with current_app.connection_for_write(url, connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=max(len(conn.alt), 1) - 1, interval_start=0, interval_step=0)


def check_kafka(timeout: float) -> None:
    """Ask the Kafka cluster (``NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS``, with the app's
    client settings) for its metadata: a broker that answers names the cluster's brokers.
    The delivery topics need not exist yet (the relay creates them on first publish)."""
    from confluent_kafka.admin import AdminClient

    from . import kafka

    metadata = AdminClient(kafka.client_config()).list_topics(timeout=timeout)
    if not metadata.brokers:
        raise ConnectionError("the cluster's metadata names no broker")


# Celery's broker keeps the name "rabbitmq" with either delivery broker (it may be Redis):
# a probe's name is what monitoring matches on.
PROBES: dict[str, Probe] = {
    "postgresql": check_postgresql,
    "redis": check_redis,
    "rabbitmq": check_rabbitmq,
}
KAFKA_PROBES: dict[str, Probe] = {"kafka": check_kafka}


def probes() -> dict[str, Probe]:
    """The probes /readyz asks with the configured delivery broker."""
    return {**PROBES, **(KAFKA_PROBES if settings.BROKER == "kafka" else {})}


# The drivers' own timeouts run this much past the view's wait, so that a service that
# does not answer is reported as a timeout by the view, never as whichever of the
# driver's error and the view's deadline came first.
DRIVER_GRACE = 1.0

_lock = threading.Lock()
_running: dict[str, Future[float]] = {}


class ProbeFailed(Exception):
    """A probe's error, with how long the probe took to fail."""

    def __init__(self, error: BaseException, seconds: float) -> None:
        super().__init__(error)
        self.error = error
        self.seconds = seconds


def _start(name: str, probe: Probe, timeout: float) -> Future[float]:
    """Run ``probe`` in a thread of its own, or join the run already under way. The
    future holds the seconds the probe took, or ``ProbeFailed``.

    A probe stuck on a server that accepts connections and never answers outlives the
    request that started it (until the driver's own timeout); requests meanwhile wait
    on that same run instead of piling up threads and connections behind it.
    """
    with _lock:
        running = _running.get(name)
        if running is not None and not running.done():
            return running
        future: Future[float] = Future()
        _running[name] = future

    def run() -> None:
        began = time.monotonic()
        try:
            probe(timeout + DRIVER_GRACE)
        except BaseException as exc:
            future.set_exception(ProbeFailed(exc, time.monotonic() - began))
        else:
            future.set_result(time.monotonic() - began)

    threading.Thread(target=run, name=f"notifications-health-{name}", daemon=True).start()
    return future


def readiness(timeout: float | None = None) -> dict[str, Any]:
    """Ask every probe at once and wait at most ``timeout`` seconds in all
    (``NOTIFICATIONS_HEALTH_TIMEOUT`` by default).

    Returns ``{"status": "ok" | "unavailable", "checks": {name: {"state": "ok" |
    "failed" | "timeout", "seconds": ..., "error": ...}}}``; never raises.
    """
    timeout = float(settings.HEALTH_TIMEOUT if timeout is None else timeout)
    futures = {name: _start(name, probe, timeout) for name, probe in probes().items()}
    deadline = time.monotonic() + timeout
    checks: dict[str, dict[str, Any]] = {}
    for name, future in futures.items():
        try:
            seconds = future.result(timeout=max(0.0, deadline - time.monotonic()))
            result: dict[str, Any] = {"state": "ok", "seconds": round(seconds, 3)}
        except ProbeFailed as exc:
            result = {"state": "failed", "error": _describe(exc.error), "seconds": round(exc.seconds, 3)}
        except TimeoutError:
            result = {"state": "timeout", "error": f"no answer within {timeout:g}s", "seconds": timeout}
        checks[name] = result
    ok = all(check["state"] == "ok" for check in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"[:500]


@never_cache
@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    """200 while the process serves requests; it asks no other service (a liveness
    probe that failed whenever the database did would restart every web process)."""
    return HttpResponse("ok\n", content_type="text/plain")


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL, Redis and the brokers all answer, 503 otherwise.

    The body names each check's state and error for callers ``access.allowed`` admits
    (loopback, the ops token, staff); others get the status code and the overall status
    only, which is all a load balancer or a Kubernetes probe reads.
    """
    report = readiness()
    status = 200 if report["status"] == "ok" else 503
    body = report if access.allowed(request) else {"status": report["status"]}
    return JsonResponse(body, status=status)


urlpatterns = [
    path("healthz", healthz, name="notifications-healthz"),
    path("readyz", readyz, name="notifications-readyz"),
]
