"""The plain Celery peer: one task per email that calls Django's ``send_mail``, published
with ``.delay()``. Late acks, JSON, a classic durable queue and otherwise Celery's
defaults: no outbox, no deduplication, no publisher confirms, no result backend.

Worker: ``celery -A project.bench.peer_celery worker -Q bench.plain``.
"""

import os

from celery import Celery
from django.core.mail import send_mail

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.bench.peer_settings")

QUEUE = "bench.plain"

# Not the current app: the benchmark imports this module beside the project's own app.
app = Celery("bench_plain", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_ignore_result=True,
    task_default_queue=QUEUE,
)


@app.task(name="bench.plain.send_email", acks_late=True)
def send_email(to: str, subject: str, body: str) -> int:
    """Send one email through Django's email backend (a new SMTP connection each time)."""
    return send_mail(subject, body, None, [to])
