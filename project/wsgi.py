"""WSGI entry point: the web process (a WSGI server such as gunicorn, and ``manage.py
runserver``, which loads it at start).

It refuses to load in production mode without ``DJANGO_SECRET_KEY``: the admin's
sessions and CSRF tokens are signed with the key, and a missing one is a setup mistake
to stop at start, not at the first login.
"""

import os

from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

MISSING_SECRET_KEY = (
    "Refusing to start the web process: DJANGO_SECRET_KEY is not set and DJANGO_DEBUG is off. "
    "Set DJANGO_SECRET_KEY to a long random value, e.g. "
    "python -c 'import secrets; print(secrets.token_urlsafe(50))' "
    "(or DJANGO_DEBUG=1 on a developer machine)."
)


def require_secret_key() -> None:
    """Raise ``ImproperlyConfigured`` with what to set when the settings have no secret key."""
    from django.conf import settings

    try:
        settings.SECRET_KEY  # noqa: B018  (Django raises when it is empty)
    except ImproperlyConfigured:
        raise ImproperlyConfigured(MISSING_SECRET_KEY) from None


require_secret_key()
application = get_wsgi_application()
