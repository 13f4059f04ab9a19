"""The Celery application: configuration comes from Django settings (CELERY_* names)."""

import os
import sys

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")

from notifications.broker import configure  # noqa: E402  (needs DJANGO_SETTINGS_MODULE)

configure(app)
app.autodiscover_tasks()

from . import flower  # noqa: E402  (Flower refuses to serve beyond loopback without auth)

if flower.invoked(sys.argv):
    flower.install_guard()
