"""The exception tree: one root, and leaves that also carry the standard category."""


class NotificationError(Exception):
    """Root of every error this app raises."""


class InvalidNotification(NotificationError, ValueError):
    """``notify()`` was given a value it cannot send; nothing was written.

    ``field`` names the offending keyword argument so the caller can act on it.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class NotificationConflict(InvalidNotification):
    """The key of ``notify()`` is already in use for a notification with different
    content (or twice in one ``notify_many()`` call); nothing was written.

    ``key`` is the idempotency key, ``fields`` the differing fields in keyword order,
    ``field`` the first of them. ``NOTIFICATIONS_KEY_REUSE = "return"`` turns the error
    off: a repeat then returns the existing notification, whatever it carries.
    """

    def __init__(self, field: str, key: str, fields: tuple[str, ...]) -> None:
        self.key = key
        self.fields = fields
        super().__init__(
            field,
            f"key {key!r} is already used by a notification with a different {', '.join(fields)}; "
            "a repeat must carry the same content, a new email needs a new notification_id "
            "(NOTIFICATIONS_KEY_REUSE)",
        )


class DeliveryError(NotificationError):
    """Root of the errors a delivery attempt can end with."""


class TransientDeliveryError(DeliveryError):
    """The mail server did not take the message, and trying again later may work
    (4xx reply, refused connection, timeout before the message was handed over)."""


class MailServerUnreachable(TransientDeliveryError):
    """No connection to the mail server (refused, timed out, or a 4xx greeting): nothing
    was sent, and the rest of the batch would fail the same way now."""


class AmbiguousDeliveryError(TransientDeliveryError):
    """The connection failed while the message was being handed over: the server
    may or may not have accepted it. Retrying may produce a second copy."""


class PermanentDeliveryError(DeliveryError):
    """The mail server rejected the message for good (5xx reply)."""


class UnbuildableEmail(PermanentDeliveryError):
    """The email could not be built (before any SMTP command): nothing was sent, and
    sending it again would fail the same way."""


class ClaimLost(NotificationError):
    """Another worker took over this notification's claim (our fencing token is
    stale); whatever this worker was about to write is refused."""
