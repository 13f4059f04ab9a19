"""Settings for the example project, read from the environment.

Every value defaults to the local services on their standard ports, so a developer
machine needs no configuration; production sets the environment variables.
"""

import json
import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


DEBUG = env_bool("DJANGO_DEBUG", False)
# Without DJANGO_SECRET_KEY, debug mode (local use) gets a fixed key that is public, and
# production mode gets none: Django then refuses every use of the key (sessions, CSRF
# tokens, password resets) with ImproperlyConfigured, and the web process refuses to start
# (project/wsgi.py). Workers, beat and migrate never use the key, so they start without one.
LOCAL_SECRET_KEY = "django-insecure-local-only-set-DJANGO_SECRET_KEY"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or (LOCAL_SECRET_KEY if DEBUG else "")
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "notifications",
    # This repository's own tools (manage.py devstack, bench, bench_backlog): installed here
    # only, so a service that installs the app does not get them.
    "project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/notifications"),
        conn_max_age=60,
        conn_health_checks=True,
    )
}
# A process cut off from PostgreSQL finds out in seconds rather than at the kernel's
# TCP timeouts (minutes): its statements fail, and its claims lapse to live workers.
DATABASES["default"].setdefault("OPTIONS", {}).update(
    {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10000,
        # A transaction left open by a process that was paused or cut off in the middle
        # of it holds its row locks until the server ends it (the relay's transaction
        # waits for publisher confirms inside, so this is well above that wait). Not
        # through PgBouncer in transaction mode: set it on the server's role instead.
        "options": "-c idle_in_transaction_session_timeout=60000",
    }
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Mail: Django's SMTP backend by default; any Django email backend plugs in.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "127.0.0.1")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
# Without a timeout a stalled mail server holds a claim for ever; the system checks
# require it to stay far below the claim lease and RabbitMQ's consumer_timeout.
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", 30.0)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "notifications@localhost")

# The pipeline (see notifications/conf.py for every setting and its default).
NOTIFICATIONS_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NOTIFICATIONS_MESSAGE_ID_DOMAIN = os.environ.get("NOTIFICATIONS_MESSAGE_ID_DOMAIN", "notifications.local")
NOTIFICATIONS_AMBIGUOUS = os.environ.get("NOTIFICATIONS_AMBIGUOUS", "resend")
# A live worker renews its claims every fifth of the lease; a dead or cut-off one loses
# them this many seconds after its last renewal.
NOTIFICATIONS_CLAIM_LEASE = env_float("NOTIFICATIONS_CLAIM_LEASE", 15.0)
NOTIFICATIONS_MAX_ATTEMPTS = int(os.environ.get("NOTIFICATIONS_MAX_ATTEMPTS", "8"))
NOTIFICATIONS_RETRY_BACKOFF = env_float("NOTIFICATIONS_RETRY_BACKOFF", 2.0)
NOTIFICATIONS_RETRY_BACKOFF_MAX = env_float("NOTIFICATIONS_RETRY_BACKOFF_MAX", 600.0)
NOTIFICATIONS_RELAY_INTERVAL = env_float("NOTIFICATIONS_RELAY_INTERVAL", 1.0)
NOTIFICATIONS_RECOVER_INTERVAL = env_float("NOTIFICATIONS_RECOVER_INTERVAL", 5.0)
NOTIFICATIONS_RELAY_LINGER = env_float("NOTIFICATIONS_RELAY_LINGER", 0.02)
NOTIFICATIONS_RELAY_WAKEUP = os.environ.get("NOTIFICATIONS_RELAY_WAKEUP", "redis")
NOTIFICATIONS_RELAY_POLL = env_float("NOTIFICATIONS_RELAY_POLL", 0.05)
NOTIFICATIONS_RELAY_HOLD_MAX = env_float("NOTIFICATIONS_RELAY_HOLD_MAX", 1.0)
NOTIFICATIONS_RELAY_BATCH_SIZE = int(os.environ.get("NOTIFICATIONS_RELAY_BATCH_SIZE", "200"))
NOTIFICATIONS_DELIVERY_BATCH_SIZE = int(os.environ.get("NOTIFICATIONS_DELIVERY_BATCH_SIZE", "50"))
NOTIFICATIONS_SEND_CONCURRENCY = int(os.environ.get("NOTIFICATIONS_SEND_CONCURRENCY", "4"))
NOTIFICATIONS_FAST_MIME = env_bool("NOTIFICATIONS_FAST_MIME", True)
NOTIFICATIONS_RECORD_GROUP = int(os.environ.get("NOTIFICATIONS_RECORD_GROUP", "10"))
NOTIFICATIONS_RECORD_GROUP_MS = env_float("NOTIFICATIONS_RECORD_GROUP_MS", 20.0)
# Named email backends, each with its rate and connection limits (README, "Providers and
# rate limits"), as JSON; unset: one backend from the EMAIL_* settings above. Passwords
# and API keys belong in the environment, so the whole setting comes from there.
NOTIFICATIONS_BACKENDS = (
    json.loads(os.environ["NOTIFICATIONS_BACKENDS"]) if os.environ.get("NOTIFICATIONS_BACKENDS") else None
)
NOTIFICATIONS_DEFAULT_BACKEND = os.environ.get("NOTIFICATIONS_DEFAULT_BACKEND") or None
# RabbitMQ's consumer_timeout (server setting, 30 min by default), for the system checks.
NOTIFICATIONS_CONSUMER_TIMEOUT = env_float("NOTIFICATIONS_CONSUMER_TIMEOUT", 1800.0)
# The delivery broker: "rabbitmq" (the default) or "kafka" (README, "Kafka"). With Kafka,
# Celery's own tasks still go through CELERY_BROKER_URL (RabbitMQ or Redis, never kafka://).
NOTIFICATIONS_BROKER = os.environ.get("NOTIFICATIONS_BROKER", "rabbitmq").strip().lower()
NOTIFICATIONS_KAFKA_BOOTSTRAP_SERVERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
# Security settings for the Kafka clients, only those set; the password only from the
# environment.
NOTIFICATIONS_KAFKA_CONFIG = {
    option: os.environ[name]
    for name, option in (
        ("KAFKA_SECURITY_PROTOCOL", "security.protocol"),
        ("KAFKA_SASL_MECHANISM", "sasl.mechanism"),
        ("KAFKA_SASL_USERNAME", "sasl.username"),
        ("KAFKA_SASL_PASSWORD", "sasl.password"),
        ("KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
    )
    if os.environ.get(name)
}

for _name in ("TOPIC", "HIGH_TOPIC", "DEAD_TOPIC", "GROUP"):
    if os.environ.get(f"NOTIFICATIONS_KAFKA_{_name}"):
        globals()[f"NOTIFICATIONS_KAFKA_{_name}"] = os.environ[f"NOTIFICATIONS_KAFKA_{_name}"]
NOTIFICATIONS_KAFKA_PARTITIONS = int(os.environ.get("NOTIFICATIONS_KAFKA_PARTITIONS", "12"))
NOTIFICATIONS_KAFKA_REPLICATION_FACTOR = int(os.environ.get("NOTIFICATIONS_KAFKA_REPLICATION_FACTOR", "1"))

# Operations: /healthz, /readyz (details for loopback, staff, or this bearer token) and the
# worker's alive file (see the README's "Health" section).
NOTIFICATIONS_OPS_TOKEN = os.environ.get("NOTIFICATIONS_OPS_TOKEN") or None
NOTIFICATIONS_OPS_LOOPBACK = env_bool("NOTIFICATIONS_OPS_LOOPBACK", True)
NOTIFICATIONS_HEALTH_TIMEOUT = env_float("NOTIFICATIONS_HEALTH_TIMEOUT", 2.0)
NOTIFICATIONS_WORKER_ALIVE_FILE = os.environ.get("NOTIFICATIONS_WORKER_ALIVE_FILE") or None
# Metrics (README, "Metrics"): /metrics on the web process; a worker or beat started with
# NOTIFICATIONS_METRICS_PORT serves its own counters there (with PROMETHEUS_MULTIPROC_DIR
# for a prefork worker's pool). Non-loopback scrapers present NOTIFICATIONS_OPS_TOKEN.
NOTIFICATIONS_METRICS_PORT = int(os.environ.get("NOTIFICATIONS_METRICS_PORT") or 0) or None
NOTIFICATIONS_METRICS_ADDRESS = os.environ.get("NOTIFICATIONS_METRICS_ADDRESS", "127.0.0.1")

# Celery: everything the delivery contract depends on is spelled out here, and
# notifications/checks.py refuses the values that would break it.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_RESULT_BACKEND = "django-db"
# Not extended: the arguments (the whole notification, up to 1 MiB) stay out of the result rows.
CELERY_RESULT_EXTENDED = False
CELERY_RESULT_EXPIRES = 7 * 24 * 3600
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A task that fails unexpectedly is rejected, so the quorum queue dead-letters it
# instead of the message vanishing with an ack.
CELERY_TASK_ACKS_ON_FAILURE_OR_TIMEOUT = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Keep a worker's database connection across tasks (Celery's Django fixup otherwise
# closes it after every task, and a reconnect costs more than a small batch); the
# pipeline's tasks check it before use (notifications/tasks.py).
CELERY_DB_REUSE_MAX = int(os.environ.get("NOTIFICATIONS_DB_REUSE_MAX", "1000"))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
CELERY_BROKER_HEARTBEAT = 30
# Hard limit: below RabbitMQ's consumer_timeout (30 min by default); it also bounds how
# long a stuck delivery renews its claims.
CELERY_TASK_SOFT_TIME_LIMIT = env_float("NOTIFICATIONS_TASK_SOFT_TIME_LIMIT", 90.0)
CELERY_TASK_TIME_LIMIT = env_float("NOTIFICATIONS_TASK_TIME_LIMIT", 120.0)
# Off unless watched: Flower turns events on in the workers it monitors (its enable_events
# option), and every event is a confirmed publish that would otherwise slow each delivery.
CELERY_WORKER_SEND_TASK_EVENTS = env_bool("CELERY_WORKER_SEND_TASK_EVENTS", False)

# Queues, routes and the relay's beat entries come from notifications.broker.configure(),
# called in project/celery.py, so every service that installs the app shares one topology.
# configure() routes only the pipeline's own tasks. The one other task this project runs,
# Celery's daily cleanup of expired results (beat schedules it for the django-db backend),
# goes with the pipeline's maintenance passes to the relay queue the project's workers consume.
CELERY_TASK_ROUTES = {"celery.backend_cleanup": {"queue": "notifications.relay", "routing_key": "notifications.relay"}}
NOTIFICATIONS_DELIVERY_LIMIT = int(os.environ.get("NOTIFICATIONS_DELIVERY_LIMIT", "10"))

# Logs: text by default. NOTIFICATIONS_LOG_FORMAT=json writes every line of every process
# (web, worker, beat, Celery's own lines too) as one JSON object, and turns on the
# "notifications.events" lines: one per state change of a notification, with its key
# (README, "Structured logs"). In text mode those stay off.
LOG_FORMAT = os.environ.get("NOTIFICATIONS_LOG_FORMAT", "text").strip().lower()
NOTIFICATIONS_LOG_LEVEL = os.environ.get("NOTIFICATIONS_LOG_LEVEL", "INFO")
if LOG_FORMAT == "json":
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "notifications.logs.JsonFormatter"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["console"], "level": "INFO"},
        "loggers": {
            "notifications": {"level": NOTIFICATIONS_LOG_LEVEL},
            "notifications.events": {"level": "INFO"},
            "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
        },
    }
    # Celery then logs through the root logger configured here instead of its own format.
    CELERY_WORKER_HIJACK_ROOT_LOGGER = False
else:
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "loggers": {
            "notifications": {"handlers": ["console"], "level": NOTIFICATIONS_LOG_LEVEL},
            "notifications.events": {"level": "WARNING"},
        },
    }
