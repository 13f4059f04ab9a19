"""System checks that refuse the settings which would silently break the contract.

They run with ``manage.py check`` (and every management command) and at worker start.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings as django_settings
from django.core.checks import Error, Tags, register

from . import wakeup
from .conf import DEFAULTS, settings

TAG = "notifications"


def _celery_conf() -> Any:
    from celery import current_app

    return current_app.conf


def _retry_horizon() -> float:
    """The longest time between a notification's first attempt and its last retry."""
    factor = float(settings.RETRY_BACKOFF)
    cap = float(settings.RETRY_BACKOFF_MAX)
    attempts = int(settings.MAX_ATTEMPTS)
    backoff = sum(min(cap, factor * 2**i) for i in range(attempts)) + attempts * float(settings.CLAIM_LEASE)
    return max(backoff, float(settings.GIVE_UP_AFTER))


@register(TAG, Tags.compatibility)
def check_pipeline(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    errors: list[Error] = []
    conf = _celery_conf()
    transport = dict(conf.broker_transport_options or {})
    if conf.broker_url and str(conf.broker_url).startswith(("amqp", "pyamqp")) and not transport.get("confirm_publish"):
        errors.append(
            Error(
                "Publisher confirms are off: the relay could mark a notification published "
                "that the broker never stored.",
                hint="Set CELERY_BROKER_TRANSPORT_OPTIONS = {'confirm_publish': True}.",
                id="notifications.E001",
            )
        )
    if conf.task_acks_late and not conf.task_reject_on_worker_lost:
        errors.append(
            Error(
                "task_acks_late without task_reject_on_worker_lost: Celery acks the message of a worker "
                "child that died mid-delivery, and that notification is lost.",
                hint="Set CELERY_TASK_REJECT_ON_WORKER_LOST = True.",
                id="notifications.E002",
            )
        )
    if not conf.task_acks_late:
        errors.append(
            Error(
                "task_acks_late is off: a message is acked before delivery and lost if the worker dies.",
                hint="Set CELERY_TASK_ACKS_LATE = True.",
                id="notifications.E003",
            )
        )
    serializers = {
        conf.task_serializer,
        conf.result_serializer,
        *(conf.accept_content or []),
        *(conf.result_accept_content or []),
    }
    if serializers - {"json", "application/json"}:
        errors.append(
            Error(
                f"Only JSON serialization is allowed, found {sorted(serializers)}.",
                hint="Set CELERY_TASK_SERIALIZER = CELERY_RESULT_SERIALIZER = 'json' and "
                "CELERY_ACCEPT_CONTENT = ['json'] "
                "(and CELERY_RESULT_ACCEPT_CONTENT, if set, to ['json']).",
                id="notifications.E004",
            )
        )
    lease = float(settings.CLAIM_LEASE)
    consumer_timeout = float(settings.CONSUMER_TIMEOUT)
    timeout = getattr(django_settings, "EMAIL_TIMEOUT", None)
    if not timeout:
        errors.append(
            Error(
                "EMAIL_TIMEOUT is not set: a stalled mail server would hold a claim for ever.",
                hint="Set EMAIL_TIMEOUT (seconds), e.g. 30.",
                id="notifications.E005",
            )
        )
    elif float(timeout) * 3 > consumer_timeout:
        errors.append(
            Error(
                f"EMAIL_TIMEOUT={timeout}s is not far below RabbitMQ's consumer_timeout ({consumer_timeout}s): "
                "a slow send could outlive the worker's hold on its message.",
                hint="Keep EMAIL_TIMEOUT at most a third of NOTIFICATIONS_CONSUMER_TIMEOUT.",
                id="notifications.E006",
            )
        )
    hard = conf.task_time_limit
    if not hard or float(hard) >= consumer_timeout:
        errors.append(
            Error(
                f"The task hard time limit ({hard}) must be set and below RabbitMQ's consumer_timeout "
                f"({consumer_timeout}s): it bounds how long a stuck delivery holds its message and renews "
                "its claims.",
                hint="Set CELERY_TASK_TIME_LIMIT below NOTIFICATIONS_CONSUMER_TIMEOUT.",
                id="notifications.E007",
            )
        )
    renew = settings.CLAIM_RENEW_INTERVAL
    renew = float(renew) if renew else lease / 5
    if lease <= 0 or renew <= 0 or renew > lease / 3:
        errors.append(
            Error(
                f"NOTIFICATIONS_CLAIM_RENEW_INTERVAL ({renew}s) must be positive and at most a third of "
                f"NOTIFICATIONS_CLAIM_LEASE ({lease}s): a live worker would lose its claims to a takeover "
                "after a single late renewal.",
                hint="Leave NOTIFICATIONS_CLAIM_RENEW_INTERVAL unset (a fifth of the lease) or lower it.",
                id="notifications.E012",
            )
        )
    retention = int(settings.SENT_RETENTION_DAYS) * 86400
    horizon = _retry_horizon()
    if retention < horizon * 2:
        errors.append(
            Error(
                f"Sent-email records are kept {retention}s, less than twice the longest retry horizon "
                f"({horizon:.0f}s): "
                "a late redelivery could find no record and send again.",
                hint="Raise NOTIFICATIONS_SENT_RETENTION_DAYS or lower NOTIFICATIONS_MAX_ATTEMPTS / RETRY_BACKOFF_MAX "
                "/ GIVE_UP_AFTER.",
                id="notifications.E008",
            )
        )
    if settings.AMBIGUOUS not in ("resend", "hold"):
        errors.append(
            Error(
                f"NOTIFICATIONS_AMBIGUOUS={settings.AMBIGUOUS!r} is not one of 'resend', 'hold'.",
                hint="Set NOTIFICATIONS_AMBIGUOUS = 'resend' (at-least-once) or 'hold' (at-most-once).",
                id="notifications.E009",
            )
        )
    group_ms = settings.RECORD_GROUP_MS
    if isinstance(group_ms, bool) or not isinstance(group_ms, int | float) or not 0 <= group_ms <= 1000:
        errors.append(
            Error(
                f"NOTIFICATIONS_RECORD_GROUP_MS must be a number of milliseconds from 0 to 1000, not {group_ms!r}.",
                hint="It bounds how long a sending connection keeps outcomes unrecorded (default "
                f"{DEFAULTS['RECORD_GROUP_MS']}).",
                id="notifications.E029",
            )
        )
    if settings.RELAY_WAKEUP not in wakeup.MODES:
        errors.append(
            Error(
                f"NOTIFICATIONS_RELAY_WAKEUP={settings.RELAY_WAKEUP!r} is not one of 'listen', 'redis', 'poll'.",
                hint="Set NOTIFICATIONS_RELAY_WAKEUP = 'listen' (PostgreSQL NOTIFY on commit), 'redis' or 'poll'.",
                id="notifications.E028",
            )
        )
    if (conf.worker_prefetch_multiplier or 0) != 1:
        errors.append(
            Error(
                "worker_prefetch_multiplier must be 1: prefetched messages wait unacked behind a slow send "
                "and can hit RabbitMQ's consumer_timeout.",
                hint="Set CELERY_WORKER_PREFETCH_MULTIPLIER = 1.",
                id="notifications.E010",
            )
        )
    for name in (
        "RELAY_BATCH_SIZE",
        "DELIVERY_BATCH_SIZE",
        "SEND_CONCURRENCY",
        "RECORD_GROUP",
        "MAX_BATCH_ITEMS",
        "RETENTION_DAYS",
        "PURGE_BATCH_SIZE",
    ):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(
                Error(
                    f"NOTIFICATIONS_{name} must be a whole number of at least 1, not {value!r}.",
                    hint=f"Set NOTIFICATIONS_{name} to a positive integer (default {DEFAULTS[name]}).",
                    id="notifications.E011",
                )
            )
    if settings.KEY_REUSE not in ("error", "return"):
        errors.append(
            Error(
                f"NOTIFICATIONS_KEY_REUSE={settings.KEY_REUSE!r} is not one of 'error', 'return'.",
                hint="Set NOTIFICATIONS_KEY_REUSE = 'error' (a repeat of a key with different content raises "
                "NotificationConflict) or 'return' (it returns the existing notification).",
                id="notifications.E013",
            )
        )
    kept, records = settings.RETENTION_DAYS, settings.SENT_RETENTION_DAYS
    if isinstance(kept, int) and isinstance(records, int) and kept < records:
        errors.append(
            Error(
                f"NOTIFICATIONS_RETENTION_DAYS ({kept}) is shorter than NOTIFICATIONS_SENT_RETENTION_DAYS "
                f"({records}): a notification is deleted only after its sent-email record (else a repeat of its "
                "key would make a notification no worker sends), so its content would be kept "
                f"{records} days, not {kept}.",
                hint="Keep NOTIFICATIONS_RETENTION_DAYS at least NOTIFICATIONS_SENT_RETENTION_DAYS: lower both "
                "(E008 bounds the sent-email retention from below) or raise NOTIFICATIONS_RETENTION_DAYS.",
                id="notifications.E015",
            )
        )
    relayed = settings.RELAY_DATABASES
    if relayed is not None and settings.DATABASE not in relayed:
        errors.append(
            Error(
                f"NOTIFICATIONS_RELAY_DATABASES={list(relayed)!r} leaves out NOTIFICATIONS_DATABASE "
                f"({settings.DATABASE!r}): retries, recoveries and admin resends queued there would never "
                "be published.",
                hint=f"Add {settings.DATABASE!r} to NOTIFICATIONS_RELAY_DATABASES (or leave it unset).",
                id="notifications.E014",
            )
        )
    return errors


BROKERS = ("rabbitmq", "kafka")
# One bootstrap address as librdkafka reads it: an optional listener name, a host name or
# IPv4 address or bracketed IPv6 address, and an optional port (9092 when left out).
_BOOTSTRAP_ADDRESS = re.compile(r"(?:[A-Za-z][A-Za-z0-9_]*://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?")
# kombu's names for its confluentkafka transport.
_KOMBU_KAFKA = ("kafka", "confluentkafka")


def _celery_broker_urls(conf: Any) -> list[str]:
    """Every URL Celery's broker setting lists (a string, ``;``-separated, or a list)."""
    url = conf.broker_url
    urls = url if isinstance(url, list | tuple) else str(url or "").split(";")
    return [str(u).strip() for u in urls if str(u).strip()]


def _bootstrap_problem(servers: Any) -> str | None:
    """Why ``servers`` is no list of Kafka bootstrap addresses, or None."""
    if not isinstance(servers, str) or not servers.strip():
        return "is empty" if servers in (None, "") or isinstance(servers, str) else f"is not a string: {servers!r}"
    for address in servers.split(","):
        found = _BOOTSTRAP_ADDRESS.fullmatch(address.strip())
        if found is None or (found.group(1) is not None and not 0 < int(found.group(1)) < 65536):
            return f"has {address.strip()!r}, which is not host:port"
    return None


@register(TAG, Tags.compatibility)
def check_broker(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """``NOTIFICATIONS_BROKER`` and, with Kafka, its settings; and Celery's own broker,
    which must never be kombu's Kafka transport."""
    errors: list[Error] = []
    conf = _celery_conf()
    transport = str(conf.broker_transport or "").lower()
    schemes = {url.split("://", 1)[0].lower() for url in _celery_broker_urls(conf) if "://" in url}
    used = (schemes | {transport}) & set(_KOMBU_KAFKA)
    if used:
        errors.append(
            Error(
                f"CELERY_BROKER_URL uses kombu's Kafka transport ({', '.join(sorted(used))}): it "
                "acks by committing every assigned partition at once (acking whatever was fetched before the "
                "message) and publishes with no delivery report, so a crash loses tasks (a countdown task "
                "never runs after a worker restart) and the relay marks rows published that Kafka never stored.",
                hint="Set NOTIFICATIONS_BROKER=kafka with KAFKA_BOOTSTRAP_SERVERS=host:port for the delivery "
                "path, and keep CELERY_BROKER_URL on RabbitMQ (amqp://) or Redis (redis://) for Celery's own "
                "tasks.",
                id="notifications.E026",
            )
        )
    broker = settings.BROKER
    if broker not in BROKERS:
        errors.append(
            Error(
                f"NOTIFICATIONS_BROKER={broker!r} is not one of 'rabbitmq', 'kafka'.",
                hint="Set NOTIFICATIONS_BROKER = 'rabbitmq' (the default: quorum queues through CELERY_BROKER_URL) "
                "or 'kafka' (topics on KAFKA_BOOTSTRAP_SERVERS).",
                id="notifications.E022",
            )
        )
        return errors
    if broker != "kafka":
        return errors
    try:
        import confluent_kafka  # noqa: F401
    except Exception as exc:
        errors.append(
            Error(
                f"NOTIFICATIONS_BROKER='kafka' but confluent_kafka cannot be imported ({type(exc).__name__}: {exc}).",
                hint="Install confluent-kafka (pip install 'confluent-kafka>=2.15,<3'), or set "
                "NOTIFICATIONS_BROKER = 'rabbitmq'.",
                id="notifications.E023",
            )
        )
    problem = _bootstrap_problem(settings.KAFKA_BOOTSTRAP_SERVERS)
    if problem:
        errors.append(
            Error(
                f"NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS {problem}: the relay and the workers could reach no broker.",
                hint="Set KAFKA_BOOTSTRAP_SERVERS (NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS) to a comma-separated list "
                "of host:port, e.g. 'kafka-1:9092,kafka-2:9092'.",
                id="notifications.E024",
            )
        )
    for name in ("KAFKA_PARTITIONS", "KAFKA_REPLICATION_FACTOR"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(
                Error(
                    f"NOTIFICATIONS_{name} must be a whole number of at least 1, not {value!r}: the relay creates "
                    "the delivery topics with it.",
                    hint=f"Set NOTIFICATIONS_{name} to a positive integer (default {DEFAULTS[name]}; a replication "
                    "factor of 3 in production).",
                    id="notifications.E025",
                )
            )
    config = settings.KAFKA_CONFIG
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        errors.append(
            Error(
                "NOTIFICATIONS_KAFKA_CONFIG must be a dict of librdkafka settings (names to values), not "
                f"{type(config).__name__} (or one with keys that are not strings).",
                hint="Set NOTIFICATIONS_KAFKA_CONFIG to e.g. {'security.protocol': 'SASL_SSL', 'sasl.mechanism': "
                "'SCRAM-SHA-512'} (the project reads them from KAFKA_SECURITY_PROTOCOL and the other KAFKA_* "
                "variables).",
                id="notifications.E027",
            )
        )
    return errors


def _backend_errors(name: str, entry: Any) -> list[Error]:
    """What is wrong with the entry ``name`` of ``NOTIFICATIONS_BACKENDS``."""
    from django.utils.module_loading import import_string

    from .backends import IDEMPOTENCY_PLACES, KEYS

    where = f"NOTIFICATIONS_BACKENDS[{name!r}]"
    if not isinstance(name, str) or not name or len(name) > 100:
        return [
            Error(
                f"{where}: a backend's name must be a string of 1 to 100 characters (it is stored on each "
                "notification).",
                hint="Rename the entry.",
                id="notifications.E016",
            )
        ]
    if not isinstance(entry, dict):
        return [
            Error(
                f"{where} must be a dict, not {type(entry).__name__}.",
                hint='Write {"BACKEND": "dotted.path.EmailBackend", "OPTIONS": {...}, "RATE_LIMIT": ...}.',
                id="notifications.E016",
            )
        ]
    errors: list[Error] = []
    unknown = sorted(map(str, set(entry) - KEYS))
    if unknown:
        errors.append(
            Error(
                f"{where} has unknown keys {unknown}.",
                hint=f"The keys are {', '.join(sorted(KEYS))}.",
                id="notifications.E016",
            )
        )
    options = entry.get("OPTIONS", {})
    if options is not None and not isinstance(options, dict):
        errors.append(
            Error(
                f"{where}['OPTIONS'] must be a dict of the backend's keyword arguments, not {type(options).__name__}.",
                hint='E.g. {"host": "smtp.example.com", "port": 587, "use_tls": True, "timeout": 10}.',
                id="notifications.E016",
            )
        )
    path = entry.get("BACKEND") or django_settings.EMAIL_BACKEND
    try:
        if not isinstance(path, str):
            raise TypeError(f"not a string: {path!r}")
        import_string(path)
    except Exception as exc:
        errors.append(
            Error(
                f"{where}['BACKEND'] = {path!r} cannot be imported: {exc}.",
                hint="Give the dotted path of a Django email backend that is installed, e.g. "
                "'django.core.mail.backends.smtp.EmailBackend' or 'anymail.backends.resend.EmailBackend'.",
                id="notifications.E017",
            )
        )
    rate = entry.get("RATE_LIMIT")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1e6):
        errors.append(
            Error(
                f"{where}['RATE_LIMIT'] must be a positive number of emails per second, not {rate!r}.",
                hint="Set it to the provider's limit (e.g. 14 for a sending quota of 14/s), or leave it out "
                "for no limit.",
                id="notifications.E018",
            )
        )
    limit = entry.get("CONNECTIONS")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        errors.append(
            Error(
                f"{where}['CONNECTIONS'] must be a whole number of at least 1, not {limit!r}.",
                hint="Connections per worker process (the total is CONNECTIONS x worker processes); leave it out "
                "for NOTIFICATIONS_SEND_CONCURRENCY.",
                id="notifications.E019",
            )
        )
    header, place = entry.get("IDEMPOTENCY_HEADER"), entry.get("IDEMPOTENCY_IN", "email")
    valid_header = header is None or (
        isinstance(header, str) and header.isascii() and header.isprintable() and header and ":" not in header
    )
    if not valid_header or place not in IDEMPOTENCY_PLACES or (place == "request" and not header):
        errors.append(
            Error(
                f"{where}: IDEMPOTENCY_HEADER={header!r} with IDEMPOTENCY_IN={place!r} is not a header name and "
                "a place for it.",
                hint="IDEMPOTENCY_HEADER is a header name (e.g. 'Resend-Idempotency-Key'); IDEMPOTENCY_IN is "
                "'email' (the default: an email header) or 'request' (a header of the API's HTTP request). "
                'The README\'s "Providers and rate limits" lists the providers.',
                id="notifications.E021",
            )
        )
    return errors


@register(TAG, Tags.compatibility)
def check_backends(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """``NOTIFICATIONS_BACKENDS`` and ``NOTIFICATIONS_DEFAULT_BACKEND``: a malformed entry
    would fail (or silently mis-send) every email of its backend, so it is refused at
    start-up."""
    configured = settings.BACKENDS
    if configured is None:
        names: list[str] = []
    elif not isinstance(configured, dict) or not configured:
        return [
            Error(
                f"NOTIFICATIONS_BACKENDS must be a non-empty dict of named backends, not {configured!r}.",
                hint='E.g. {"transactional": {"BACKEND": "django.core.mail.backends.smtp.EmailBackend", '
                '"OPTIONS": {...}}}; or leave it unset for one backend from the EMAIL_* settings.',
                id="notifications.E016",
            )
        ]
    else:
        names = list(configured)
    errors = [e for name in names for e in _backend_errors(name, configured[name])]  # type: ignore[index]
    default = settings.DEFAULT_BACKEND
    if default is not None and default not in (names or ["default"]):
        errors.append(
            Error(
                f"NOTIFICATIONS_DEFAULT_BACKEND={default!r} is not a name in NOTIFICATIONS_BACKENDS "
                f"({', '.join(names or ['default'])}).",
                hint="Name one of the configured backends, or leave it unset for the first one.",
                id="notifications.E020",
            )
        )
    return errors


def refuse_unsafe_worker(**kwargs: Any) -> None:
    """At worker and beat start: refuse to run with settings that break the contract
    (Celery runs Django's checks there but only logs them).

    Raises ``SystemExit``: Celery logs and swallows any ``Exception`` a signal handler
    raises, and the worker would start anyway.
    """
    errors = [e for e in (*check_pipeline(), *check_backends(), *check_broker()) if e.is_serious()]
    if errors:
        lines = "\n".join(f"{e.id}: {e.msg}\n    HINT: {e.hint}" for e in errors)
        raise SystemExit(f"notifications: unsafe settings, refusing to start:\n{lines}")


def _connect_signals() -> None:
    from celery.signals import beat_init, worker_init

    worker_init.connect(refuse_unsafe_worker, weak=False, dispatch_uid="notifications.checks.worker")
    beat_init.connect(refuse_unsafe_worker, weak=False, dispatch_uid="notifications.checks.beat")


_connect_signals()
