"""A notification's state changes, each counted (``metrics.py``) and logged in one place.

Every function here is called once the change is committed (from an on-commit hook, or
after the statement that recorded it), so a rolled-back write is neither counted nor
logged. Counting is an in-memory increment; the log line, one per change on the
``notifications.events`` logger at INFO, is built only when that logger is enabled
(``NOTIFICATIONS_LOG_FORMAT=json`` in this project's settings; off by default). Its
fields (``event``, ``key``, ``notification_id``: the row's id in the database of the
process that logs it, ``attempt``, ``worker``, ``latency_seconds``, ``reason``) let one
notification be followed by its key across the caller's, the relay's and the workers'
logs; ``logs.JsonFormatter`` writes them as one JSON object per line.

Nothing here may raise into the pipeline: a failure to count or log is logged.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec

from . import metrics

if TYPE_CHECKING:
    from .managers import PendingMessage
    from .models import Notification

logger = logging.getLogger("notifications.events")
_problems = logging.getLogger(__name__ + ".problems")
_HOST = socket.gethostname()


def enabled() -> bool:
    """Whether event lines are logged (checked before any line is built)."""
    return logger.isEnabledFor(logging.INFO)


def worker() -> str:
    """This process, as the delivery records name their owner: ``host:pid``."""
    return f"{_HOST}:{os.getpid()}"


def age_seconds(created_at: Any) -> float | None:
    """Seconds since ``created_at`` (an ISO 8601 string, as payloads carry it, or a
    datetime), None when unknown."""
    if not created_at:
        return None
    try:
        when = created_at if isinstance(created_at, datetime) else datetime.fromisoformat(str(created_at))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, time.time() - when.timestamp())


def _log(event: str, key: str, **fields: Any) -> None:
    """One line for one change: ``event key name=value ...`` as text, and every field as
    a record attribute (the JSON formatter writes them out)."""
    values = {name: value for name, value in fields.items() if value is not None}
    if isinstance(values.get("latency_seconds"), float):
        values["latency_seconds"] = round(values["latency_seconds"], 4)
    text = " ".join(f"{name}={value}" for name, value in values.items())
    logger.info("%s %s %s", event, key, text, extra={"event": event, "key": key, **values})


P = ParamSpec("P")


def _guarded(function: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            function(*args, **kwargs)
        except Exception:  # counting or logging must never fail a delivery
            _problems.exception("could not record the %s event", function.__name__)

    return call


@_guarded
def created(notifications: Sequence[Notification], created_ids: set[int], repeats: int = 0) -> None:
    """notify() committed: ``created_ids`` are new, the other notifications (and
    ``repeats`` items folded into them within the call) were repeats of their key."""
    metrics.CREATED.inc(len(created_ids))
    hits = len(notifications) - len(created_ids) + repeats
    if hits:
        metrics.DEDUPE_HITS.inc(hits)
    if enabled():
        for n in notifications:
            if n.pk in created_ids:
                _log("created", n.key, notification_id=n.pk, service=n.service)
            else:
                _log("deduplicated", n.key, notification_id=n.pk, status=n.status)


@_guarded
def published(rows: Sequence[PendingMessage]) -> None:
    """A relay batch committed: ``rows`` are published (their messages confirmed)."""
    metrics.PUBLISHED.inc(len(rows))
    if enabled():
        for row in rows:
            key = str(row.payload["key"])
            latency = age_seconds(row.payload.get("created_at"))
            _log(
                "published", key, notification_id=row.notification_id, outbox_id=row.outbox_id, latency_seconds=latency
            )


@contextmanager
def relay_pass() -> Iterator[list[int]]:
    """Time one relay pass; the caller appends the rows each batch published."""
    began = time.monotonic()
    rows: list[int] = []
    try:
        yield rows
    except Exception:
        metrics.RELAY_PASS_FAILURES.inc()
        raise
    finally:
        metrics.RELAY_PASS_SECONDS.observe(time.monotonic() - began)
        metrics.RELAY_PASS_ROWS.observe(sum(rows))


@_guarded
def cancelled(key: str, pk: int | None, in_time: bool) -> None:
    """``cancel()`` committed: nothing more is sent for ``key`` (and, ``in_time``, nothing was)."""
    metrics.cancelled["true" if in_time else "false"].inc()
    if enabled():
        _log("cancelled", key, notification_id=pk, in_time=in_time)


@_guarded
def recovered(keys: Iterable[str]) -> None:
    """Recovery gave these keys a new outbox row (their delivery had stalled)."""
    keys = list(keys)
    metrics.RECOVERED.inc(len(keys))
    if enabled():
        for key in keys:
            _log("requeued", key)


@_guarded
def claimed(key: str, pk: int | None, attempt: int, token: int, takeover: bool) -> None:
    """A worker committed its claim on ``key`` and is about to make attempt ``attempt``."""
    if takeover:
        metrics.TAKEOVERS.inc()
    if enabled():
        _log("claimed", key, notification_id=pk, attempt=attempt, token=token, takeover=takeover, worker=worker())


@_guarded
def ambiguous(key: str, pk: int | None, attempt: int, action: str) -> None:
    """A send of ``key`` may have reached the mail server (its connection failed after the
    hand-over, or its worker died mid-send): counted as ``notifications.ambiguous_count``
    is, and resent, held or failed (``action``)."""
    metrics.ambiguous.get(action, metrics.ambiguous["fail"]).inc()
    if enabled():
        _log("ambiguous", key, notification_id=pk, attempt=attempt, action=action, worker=worker())


@_guarded
def delivered(
    outcome: str,
    key: str,
    pk: int | None = None,
    attempt: int | None = None,
    *,
    reason: str | None = None,
    latency: float | None = None,
    retry_in: float | None = None,
    detail: str | None = None,
) -> None:
    """A delivery of ``key`` ended with ``outcome`` (``metrics.OUTCOMES``), recorded.

    ``reason`` is a failure's category (``metrics.FAILURE_REASONS``); ``latency`` the
    seconds since the commit, for a sent one; ``detail`` what the mail server or the
    pipeline said (logged, never a label).
    """
    metrics.deliveries[outcome].inc()
    if outcome == "failed":
        metrics.failures.get(reason or "other", metrics.failures["other"]).inc()
    elif outcome == "sent" and latency is not None:
        metrics.LATENCY.observe(latency)
    if enabled():
        _log(
            outcome,
            key,
            notification_id=pk,
            attempt=attempt,
            reason=reason,
            latency_seconds=latency,
            retry_in_seconds=round(retry_in, 3) if retry_in else None,
            detail=(detail or "")[:300] or None,
            worker=worker(),
        )
