"""Exactly-once notification email for Django: ``notify()`` inside your transaction.

Exports are lazy (PEP 562) so that importing the package does not load models
before Django's app registry is ready.
"""

from typing import TYPE_CHECKING, Any

__all__ = [
    "Cancellation",
    "InvalidNotification",
    "NotificationConflict",
    "NotificationError",
    "cancel",
    "notify",
    "notify_many",
]

if TYPE_CHECKING:
    from .api import Cancellation, cancel, notify, notify_many
    from .exceptions import InvalidNotification, NotificationConflict, NotificationError


def __getattr__(name: str) -> Any:
    if name in ("notify", "notify_many", "cancel", "Cancellation"):
        from . import api

        return getattr(api, name)
    if name in ("InvalidNotification", "NotificationConflict", "NotificationError"):
        from . import exceptions

        return getattr(exceptions, name)
    raise AttributeError(f"module 'notifications' has no attribute {name!r}")
