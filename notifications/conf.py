"""Every setting of the app in one place, with its default.

Lookup order: the Django setting ``NOTIFICATIONS_<NAME>``, else the default here.
A value is looked up once and kept (``notify()`` reads a dozen settings, and a setting
left at its default costs Django's settings object two failed lookups each time);
Django's ``setting_changed`` signal, sent by ``override_settings`` and the tests'
``settings`` fixture, forgets it again.
"""

from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # Where the Redis fast-path lock lives. Losing it never causes a second email.
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_KEY_PREFIX": "notifications:",
    # Domain of the Message-ID header: <sha256(key)@domain>.
    "MESSAGE_ID_DOMAIN": "notifications.local",
    # What a redelivery does when the previous holder died mid-send:
    # "resend" (at-least-once, same Message-ID) or "hold" (at-most-once, a person decides).
    "AMBIGUOUS": "resend",
    # Seconds a claim stays exclusive after its holder last renewed it. A live holder
    # renews its claims every CLAIM_RENEW_INTERVAL while it works on them, so this is
    # what a dead or cut-off worker costs the emails it held.
    "CLAIM_LEASE": 15.0,
    # Seconds between renewals (None: a fifth of the lease).
    "CLAIM_RENEW_INTERVAL": None,
    # Delivery attempts (transient failures) before a notification ends as failed.
    "MAX_ATTEMPTS": 8,
    # Exponential backoff: factor seconds, doubled per attempt, capped, full jitter.
    "RETRY_BACKOFF": 2.0,
    "RETRY_BACKOFF_MAX": 600.0,
    # How long sent-email records are kept; they are what makes a late redelivery a no-op.
    "SENT_RETENTION_DAYS": 30,
    # How long notifications (with their content) are kept once finished (sent or
    # failed; a held ambiguous one is kept until a person decides). While its row exists
    # a repeat of the key returns it; a notification outlives its sent-email record, so
    # after both are gone a repeat of the key is a new notification and sends again.
    "RETENTION_DAYS": 30,
    # Rows per purge transaction: each batch is locked (skipping rows anyone else holds),
    # deleted and committed on its own, so the purge never holds many locks for long.
    "PURGE_BATCH_SIZE": 1000,
    # Relay: rows per batch, and the beat period of the safety-net pass.
    "RELAY_BATCH_SIZE": 200,
    # Notifications per broker message: a worker claims them in one transaction and sends
    # them over one mail-server connection. A message that crashed its worker is split.
    "DELIVERY_BATCH_SIZE": 50,
    # Through Django's SMTP backend, write each email's bytes directly (notifications.mime),
    # byte for byte what Django's email code would send, at a small part of its cost.
    # False: Django's email code builds every email.
    "FAST_MIME": True,
    # Mail-server connections a worker process sends a batch over at once (threads).
    "SEND_CONCURRENCY": 4,
    # A sending connection stamps the start of up to RECORD_GROUP emails in one statement
    # and records their outcomes in the next, so a group costs one round trip and one
    # commit instead of one per email. The price is the window of unknown outcome: if the
    # worker dies, every email of its unrecorded groups counts as ambiguous (resent with
    # the same Message-ID, or held). Groups are made to be sent in about RECORD_GROUP_MS
    # milliseconds at the recent pace, and outcomes are recorded once the oldest is that
    # old, so a slow mail server gets groups of one. RECORD_GROUP = 1: one email at a time.
    "RECORD_GROUP": 10,
    "RECORD_GROUP_MS": 20.0,
    "RELAY_INTERVAL": 1.0,
    # How often beat looks for claims whose holder stopped renewing them, and for
    # notifications whose message was lost.
    "RECOVER_INTERVAL": 5.0,
    # Seconds past a lease's end before recovery gives the key a new message (a worker
    # retrying the key itself usually takes it over first).
    "RECOVER_GRACE": 2.0,
    # Seconds after publishing with no worker's claim before a notification's message
    # counts as lost (only looked for while no delivery message waits in the queue). A
    # worker cut off from its database holds the messages it had taken unclaimed; one
    # that was only slow costs a message that finds its claim settled.
    "RECOVER_UNCLAIMED_AFTER": 15.0,
    # Seconds a notification may go without reaching any mail server (refused
    # connections, a wrong password, 421s) before it ends failed. That is no attempt.
    "GIVE_UP_AFTER": 86400.0,
    # Wake the relay when a notify() commits, so delivery does not wait for beat.
    "RELAY_ON_COMMIT": True,
    # Run the relay loop inside beat (woken on commit, see RELAY_WAKEUP).
    "RELAY_IN_BEAT": True,
    # How a commit wakes the relay loop (``notifications.wakeup``): "listen" (the insert
    # notifies through PostgreSQL, delivered on commit), "redis" (a push from a thread of
    # the caller after the commit) or "poll" (the loop looks every RELAY_POLL seconds).
    "RELAY_WAKEUP": "redis",
    "RELAY_POLL": 0.05,
    # Seconds the relay loop waits after a wake-up, so a burst of commits goes out in
    # fuller broker messages (a little latency for much less work per email).
    "RELAY_LINGER": 0.02,
    # While delivery messages wait in the queue for a free worker, new rows would wait
    # behind them anyway: the relay loop holds them (up to this long) and publishes them
    # in full messages once the queue has room, so a backlog costs less per email.
    "RELAY_HOLD_MAX": 1.0,
    # Quorum-queue delivery limit before a message is dead-lettered.
    "DELIVERY_LIMIT": 10,
    # RabbitMQ's consumer_timeout in seconds (server default 30 min); checked against our timeouts.
    "CONSUMER_TIMEOUT": 1800.0,
    # Input limits.
    "MAX_BODY_BYTES": 1024 * 1024,
    "MAX_SUBJECT_LENGTH": 998,
    # Most items one notify_many() call takes (it writes them in one transaction).
    "MAX_BATCH_ITEMS": 10000,
    # The largest broker message the relay publishes, in bytes of JSON (kombu escapes
    # every non-ASCII character, so a notification can be several times its UTF-8 size).
    # notify() refuses a notification that alone would not fit.
    "MAX_MESSAGE_BYTES": 4 * 1024 * 1024,
    # A repeat of a key with different content: "error" (NotificationConflict) or
    # "return" (the existing notification, the new content dropped).
    "KEY_REUSE": "error",
    # Named email backends (README, "Providers and rate limits"): {"name": {"BACKEND":
    # dotted path, "OPTIONS": {...}, "RATE_LIMIT": emails/s, "CONNECTIONS": n}}. None:
    # one backend, "default", from Django's EMAIL_* settings.
    "BACKENDS": None,
    # The backend of a notify() that names none (None: the first of BACKENDS).
    "DEFAULT_BACKEND": None,
    # The database whose EmailTemplate rows notify(template=...) renders (None: the one
    # notify() writes to). A calling service with a database of its own can point it at a
    # (read-only) connection to the notification service's database, where the admin
    # edits them.
    "TEMPLATES_DATABASE": None,
    # Broker names.
    "EXCHANGE": "notifications",
    "DELIVER_QUEUE": "notifications.deliver",
    # High-priority deliveries: a queue of their own (RabbitMQ's quorum queues have no
    # message priorities), which every worker consumes beside the normal one unless told.
    "HIGH_QUEUE": "notifications.deliver.high",
    # Notifications per high-priority message: few, so that one waits for no batch.
    "HIGH_BATCH_SIZE": 5,
    "RELAY_QUEUE": "notifications.relay",
    "DEAD_LETTER_EXCHANGE": "notifications.dead",
    "DEAD_LETTER_QUEUE": "notifications.dead",
    # Where the dead-letter pass leaves messages that carry no notification it can read,
    # with the reason in a header: for a person, never consumed.
    "PARKED_QUEUE": "notifications.parked",
    # The delivery broker: "rabbitmq" (the quorum queues above, through CELERY_BROKER_URL)
    # or "kafka" (the topics below). Celery's own tasks (relay wake-ups, recovery, purge,
    # dead-letter passes) keep CELERY_BROKER_URL either way: kombu's Kafka transport
    # commits every partition at once and has no publisher confirms, so it cannot carry them.
    "BROKER": "rabbitmq",
    # Kafka (BROKER="kafka"): comma-separated host:port list the clients bootstrap from.
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    # Extra librdkafka client settings for every producer, consumer and admin client
    # (security.protocol, sasl.*, ssl.*): the project fills it from the environment, so
    # passwords never live in settings files.
    "KAFKA_CONFIG": {},
    # Topics for normal and high-priority deliveries (a topic each, as with the queues, so
    # a high-priority message never waits behind a partition's backlog of normal ones).
    "KAFKA_TOPIC": "notifications.deliver",
    "KAFKA_HIGH_TOPIC": "notifications.deliver.high",
    # Where a consumer copies a message it cannot decode, for a person: Kafka has no
    # dead-letter queue, and a notification that crashed its consumer is failed by it.
    "KAFKA_DEAD_TOPIC": "notifications.dead",
    # The consumer group every worker process joins; offsets commit per partition only
    # after the outcomes of the messages before them are recorded.
    "KAFKA_GROUP": "notifications",
    # For topics the relay creates on first publish when missing: partitions bound how many
    # consumers work at once (one per partition at most); production wants a replication
    # factor of 3 (with min.insync.replicas=2), a single test broker only allows 1.
    "KAFKA_PARTITIONS": 12,
    "KAFKA_REPLICATION_FACTOR": 1,
    # Seconds without a heartbeat before the group gives a consumer's partitions to others.
    "KAFKA_SESSION_TIMEOUT": 6.0,
    # Seconds a consumer sends the emails of one message for; what is left then goes back
    # through the outbox. A consumer busy in one message for longer than this plus
    # CLAIM_LEASE (cut off from PostgreSQL, say) leaves the group (max.poll.interval.ms),
    # so its partitions move on to the others instead of waiting behind it.
    "KAFKA_BUDGET": 5.0,
    # Server-side prepared statements for the statements run per email and per notify():
    # off behind a pooler that does not keep sessions (PgBouncer in transaction mode).
    "PREPARED_STATEMENTS": True,
    # Database alias the app writes to (the caller's outbox and the delivery records).
    "DATABASE": "default",
    # Database aliases whose outboxes the relay publishes (None: DATABASE only).
    # notify(using=...) accepts only these.
    "RELAY_DATABASES": None,
    # Operations pages that say more than "alive" (/readyz's details, every /metrics): who
    # may read them besides loopback callers and staff users, as "Authorization: Bearer
    # <token>" or as a basic-auth password.
    "OPS_TOKEN": None,
    # Whether a loopback caller counts as allowed. Off behind a reverse proxy on the same
    # host that sends no forwarding header (with one, a forwarded request never counts as
    # local).
    "OPS_LOOPBACK": True,
    # Seconds /readyz waits for each of PostgreSQL, Redis and the broker (asked at once).
    "HEALTH_TIMEOUT": 2.0,
    # A file the worker touches every WORKER_ALIVE_INTERVAL seconds while its consumer is
    # connected to the broker (None: no file); ``python -m notifications.healthcheck``
    # reads its age.
    "WORKER_ALIVE_FILE": None,
    "WORKER_ALIVE_INTERVAL": 2.0,
    # Metrics (README, "Metrics"). The port a worker's or beat's main process serves its
    # counters on (None: no server), and the address it binds (loopback unless told).
    "METRICS_PORT": None,
    "METRICS_ADDRESS": "127.0.0.1",
    # Who may scrape is decided by notifications.access: OPS_TOKEN and OPS_LOOPBACK above.
}


_known: dict[str, Any] = {}
PREFIX = "NOTIFICATIONS_"


class Settings:
    def __getattr__(self, name: str) -> Any:
        try:
            return _known[name]
        except KeyError:
            pass
        if name not in DEFAULTS:
            raise AttributeError(f"unknown notifications setting {name!r}")
        value = _known[name] = getattr(django_settings, PREFIX + name, DEFAULTS[name])
        return value


def _forget(*, setting: str, **kwargs: Any) -> None:
    if setting.startswith(PREFIX):
        _known.pop(setting[len(PREFIX) :], None)


setting_changed.connect(_forget)
settings = Settings()
