"""Settings for a test run: the project's settings, pointed at this run's own database,
RabbitMQ vhost, Redis db and SMTP port, with short timings so fault tests finish fast.

Values go into the environment (setdefault), so worker processes started by the tests
inherit exactly the same configuration.
"""

import os
import socket
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RUN_ID = os.environ.setdefault("NOTIFICATIONS_TEST_RUN", uuid.uuid4().hex[:10])
VHOST = f"notifications-test-{RUN_ID}"
TEST_DB = f"test_notifications_{RUN_ID}"
OTHER_DB = f"test_other_service_{RUN_ID}"
os.environ.setdefault("CELERY_BROKER_URL", f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
os.environ.setdefault("NOTIFICATIONS_TEST_REDIS_DB", str(1 + int(RUN_ID[:6], 16) % 15))
os.environ.setdefault("REDIS_URL", f"redis://127.0.0.1:6379/{os.environ['NOTIFICATIONS_TEST_REDIS_DB']}")
os.environ.setdefault("EMAIL_HOST", "127.0.0.1")
os.environ.setdefault("EMAIL_PORT", str(_free_port()))
os.environ.setdefault("EMAIL_TIMEOUT", "1.5")
os.environ.setdefault("NOTIFICATIONS_CLAIM_LEASE", "6")
os.environ.setdefault("NOTIFICATIONS_TASK_SOFT_TIME_LIMIT", "4")
os.environ.setdefault("NOTIFICATIONS_TASK_TIME_LIMIT", "5")
os.environ.setdefault("NOTIFICATIONS_RETRY_BACKOFF", "0.2")
os.environ.setdefault("NOTIFICATIONS_RETRY_BACKOFF_MAX", "1")
os.environ.setdefault("NOTIFICATIONS_MAX_ATTEMPTS", "4")
os.environ.setdefault("NOTIFICATIONS_RELAY_INTERVAL", "0.5")
os.environ.setdefault("NOTIFICATIONS_DELIVERY_LIMIT", "3")

from project.settings import *  # noqa: E402,F403

DATABASES["default"]["TEST"] = {"NAME": TEST_DB}  # noqa: F405
# Production mode without DJANGO_SECRET_KEY has no key; the tests sign sessions (the admin
# tests log in), so they bring one of their own.
SECRET_KEY = f"tests-only-not-secret-{RUN_ID}"
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
# The calling side's own template files (notify(template=...)), beside the app's.
TEMPLATES = [{**TEMPLATES[0], "DIRS": [os.path.join(os.path.dirname(__file__), "templates")]}]  # noqa: F405
