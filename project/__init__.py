"""The example Django project that runs both sides of the pipeline against one database."""

from .celery import app as celery_app

__all__ = ("celery_app",)
