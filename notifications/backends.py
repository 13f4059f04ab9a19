"""The email backends a notification may go through, by name (``NOTIFICATIONS_BACKENDS``).

Each is any Django email backend with its own options, so a provider's backend
(django-anymail's, say) plugs in beside SMTP. Without the setting there is one,
``"default"``: Django's own ``EMAIL_BACKEND`` and ``EMAIL_*`` settings. The README's
"Providers and rate limits" says what each key means; ``checks.py`` refuses a malformed
entry at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings

from .conf import settings

DEFAULT_NAME = "default"

# The keys an entry may have (anything else is a typo the system check names).
KEYS = frozenset({"BACKEND", "OPTIONS", "RATE_LIMIT", "CONNECTIONS", "IDEMPOTENCY_HEADER", "IDEMPOTENCY_IN"})
# Where IDEMPOTENCY_HEADER goes: an email header (what SMTP relays read, and what
# django-anymail copies into an API's own "headers" field), or a header of the HTTP
# request an API backend makes (django-anymail's requests-based backends).
IDEMPOTENCY_PLACES = ("email", "request")


@dataclass(frozen=True)
class Backend:
    """One entry of ``NOTIFICATIONS_BACKENDS``, read."""

    name: str
    path: str  # the Django email backend's dotted path
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of get_connection()
    rate: float | None = None  # emails per second across every worker and host (None: no limit)
    connections: int | None = None  # mail-server connections per worker process (None: SEND_CONCURRENCY)
    idempotency_header: str | None = None  # a header the provider reads as an idempotency key
    idempotency_in: str = "email"  # one of IDEMPOTENCY_PLACES


def _entries() -> dict[str, Any]:
    configured = settings.BACKENDS
    if not configured:
        return {DEFAULT_NAME: {"BACKEND": django_settings.EMAIL_BACKEND}}
    return dict(configured)


def names() -> list[str]:
    return list(_entries())


def default_name() -> str:
    return str(settings.DEFAULT_BACKEND or names()[0])


def get(name: str | None) -> Backend:
    """The backend ``name`` (empty: the default). Raises ``KeyError`` for a name this
    process is not configured with."""
    name = name or default_name()
    entry = _entries()[name]
    rate = entry.get("RATE_LIMIT")
    limit = entry.get("CONNECTIONS")
    return Backend(
        name=name,
        path=str(entry.get("BACKEND") or django_settings.EMAIL_BACKEND),
        options=dict(entry.get("OPTIONS") or {}),
        rate=float(rate) if rate else None,
        connections=int(limit) if limit else None,
        idempotency_header=entry.get("IDEMPOTENCY_HEADER") or None,
        idempotency_in=str(entry.get("IDEMPOTENCY_IN") or "email"),
    )
