"""A second Django service that installs the app with its own database: its notify()
and relay publish to the shared broker, and the project's workers deliver."""

import os

from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS, OTHER_DB

# A caller installs the app, not this repository's tools (the ``project`` app).
INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "project"]

DATABASES = {  # noqa: F405
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("OTHER_SERVICE_DB", OTHER_DB),
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": 5432,
    }
}

# Its own template files, which the notification service does not have: notify(template=...)
# renders them here, and the message carries the result.
TEMPLATES = [{**TEMPLATES[0], "DIRS": [os.path.join(os.path.dirname(__file__), "other_service_templates")]}]  # noqa: F405
