"""The three tables a notification passes through.

``Notification`` is what the caller asked for and its visible status; ``OutboxMessage``
is the transactional outbox row written beside it; ``SentEmail`` is the idempotent
consumer's record, one row per key, that makes a second email impossible.
"""

import hashlib

from django.db import models
from django.db.models.functions import Collate, Lower, Now, Reverse

from .conf import settings
from .managers import NotificationManager, OutboxMessageManager, SentEmailManager


class Status(models.TextChoices):
    CREATED = "created", "created"
    PUBLISHED = "published", "published"
    SENDING = "sending", "sending"
    RETRYING = "retrying", "retrying"
    SENT = "sent", "sent"
    FAILED = "failed", "failed"
    AMBIGUOUS = "ambiguous", "ambiguous (held)"
    SCHEDULED = "scheduled", "scheduled"
    EXPIRED = "expired", "expired"
    CANCELLED = "cancelled", "cancelled"


class Priority(models.TextChoices):
    NORMAL = "normal", "normal"
    HIGH = "high", "high"


# Statuses a notification never leaves on its own (a person may retry a failed one).
FINISHED_STATUSES = (Status.SENT, Status.FAILED, Status.EXPIRED, Status.CANCELLED)


def recipient_reversed() -> Collate:
    """The recipient as the admin's search reads it: lower case, without a closing '>'
    and reversed, so "ends with the address (or domain) typed" is a prefix match that
    the ``notifications_to_suffix_idx`` index answers (in the "C" collation, where a
    B-tree orders as LIKE compares, whatever the database's own collation)."""
    trimmed = models.Func(Lower("to"), models.Value(">"), function="RTRIM", output_field=models.TextField())
    return Collate(Reverse(trimmed), "C")


def message_id_for(key: str) -> str:
    """The Message-ID every send of ``key`` carries, so a resend is recognisable."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"<{digest}@{settings.MESSAGE_ID_DOMAIN}>"


class Notification(models.Model):
    key = models.CharField(max_length=512, help_text="{service}:{notification_id}:{user_id}")
    service = models.CharField(max_length=100)
    notification_id = models.CharField(max_length=200)
    user_id = models.CharField(max_length=200)
    to = models.CharField(max_length=320)
    from_email = models.CharField(max_length=320, blank=True, default="")
    subject = models.TextField()
    body = models.TextField()
    html_body = models.TextField(blank=True, default="")
    metadata = models.JSONField(blank=True, default=dict)
    template = models.CharField(
        max_length=200, blank=True, db_default="", help_text="The template its content was rendered from."
    )
    language = models.CharField(max_length=35, blank=True, db_default="", help_text="The template's language.")
    send_at = models.DateTimeField(null=True, blank=True, help_text="Not sent before this time.")
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Never sent after this time.")
    priority = models.CharField(max_length=8, choices=Priority.choices, db_default=Priority.NORMAL)
    backend = models.CharField(
        max_length=100,
        blank=True,
        db_default="",
        help_text="Its email backend (NOTIFICATIONS_BACKENDS).",
    )
    status = models.CharField(max_length=16, choices=Status.choices, db_default=Status.CREATED)
    attempts = models.PositiveIntegerField(db_default=0)
    ambiguous_count = models.PositiveIntegerField(
        db_default=0, help_text="Redeliveries that found the previous send's outcome unknown."
    )
    last_error = models.TextField(blank=True, db_default="")
    recoveries = models.PositiveSmallIntegerField(
        db_default=0, help_text="Messages recovery gave it after its message was lost before any claim."
    )
    created_at = models.DateTimeField(db_default=Now())
    published_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(db_default=Now())

    objects = NotificationManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["key"], name="notifications_notification_key_uniq"),
        ]
        indexes = [
            models.Index(fields=["status", "created_at"], name="notifications_status_idx"),
            models.Index(fields=["service", "created_at"], name="notifications_service_idx"),
            models.Index(fields=["user_id"], name="notifications_user_idx"),
            # Lag and sent-per-minute over the last hour read only the rows sent in it.
            models.Index(
                fields=["sent_at"], name="notifications_sent_at_idx", condition=models.Q(sent_at__isnull=False)
            ),
            # The admin's searches: a key prefix (pattern operators, so LIKE 'prefix%'
            # uses it whatever the database's collation) and the end of the recipient.
            models.Index(fields=["key"], name="notifications_key_prefix_idx", opclasses=["varchar_pattern_ops"]),
            models.Index(recipient_reversed(), name="notifications_to_suffix_idx"),
            # The admin's priority filter: high ones are few, so only they are indexed
            # (in the list's id order); a normal one is found by the list's walk by id.
            models.Index(fields=["id"], name="notifications_priority_idx", condition=models.Q(priority="high")),
        ]
        ordering = ["-id"]
        permissions = [
            # The two admin actions that decide an ambiguous send: one may send a second
            # copy, the other closes a notification that perhaps never arrived.
            ("resolve_ambiguous", "Can resend or close held ambiguous notifications"),
            # The admin's cancel: it stops an email a service asked for, for good (a
            # cancelled notification is never retried), so it is a grant of its own
            # rather than part of the change permission that retries failed ones.
            ("cancel_notification", "Can cancel notifications not yet sent"),
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def message_id(self) -> str:
        return message_id_for(self.key)


class OutboxMessage(models.Model):
    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="outbox_messages")
    created_at = models.DateTimeField(db_default=Now())
    due_at = models.DateTimeField(db_default=Now(), null=True, blank=True, help_text="Not published before this time.")
    priority = models.CharField(max_length=8, choices=Priority.choices, db_default=Priority.NORMAL)
    published_at = models.DateTimeField(null=True, blank=True)

    objects = OutboxMessageManager()

    class Meta:
        indexes = [
            # Only unpublished rows are indexed, by priority and due time, so the relay's
            # claim of what is due reads only that: as cheap with a million published
            # rows behind it, or a million scheduled ones ahead of it, as with none.
            models.Index(
                fields=["priority", "due_at", "id"],
                name="notifications_outbox_due",
                condition=models.Q(published_at__isnull=True),
            ),
            models.Index(fields=["published_at"], name="notifications_outbox_pub_idx"),
        ]
        ordering = ["id"]

    def __str__(self) -> str:
        return f"outbox #{self.pk} ({self.notification_id})"


class ClaimState(models.TextChoices):
    CLAIMED = "claimed", "claimed"
    RELEASED = "released", "released (will retry)"
    SENT = "sent", "sent"
    FAILED = "failed", "failed"
    HELD = "held", "held (ambiguous)"
    EXPIRED = "expired", "expired"
    CANCELLED = "cancelled", "cancelled"


class SentEmail(models.Model):
    """One row per idempotency key: the claim, its lease and fencing token, and the outcome.

    The unique key decides which worker may send; the token increases on every
    takeover, and every write a worker makes is conditional on still holding it.
    """

    key = models.CharField(max_length=512)
    notification = models.ForeignKey(Notification, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    state = models.CharField(max_length=16, choices=ClaimState.choices, default=ClaimState.CLAIMED)
    token = models.BigIntegerField(default=1, help_text="Fencing token; grows on every takeover.")
    owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    send_started_at = models.DateTimeField(
        null=True, blank=True, help_text="Set just before the SMTP transaction; cleared when its outcome is known."
    )
    attempts = models.PositiveIntegerField(default=0)
    ambiguous_count = models.PositiveIntegerField(default=0)
    message_id = models.CharField(max_length=200, blank=True, default="")
    response = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())
    sent_at = models.DateTimeField(null=True, blank=True)

    objects = SentEmailManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["key"], name="notifications_sentemail_key_uniq"),
        ]
        indexes = [
            models.Index(fields=["state", "lease_expires_at"], name="notifications_claim_state_idx"),
            models.Index(fields=["updated_at"], name="notifications_sent_updated_idx"),
            # The admin's search by Message-ID, the handle a bounce or a complaint carries.
            models.Index(
                fields=["message_id"], name="notifications_sent_msgid_idx", condition=~models.Q(message_id="")
            ),
        ]
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.key} ({self.state})"


class EmailTemplate(models.Model):
    """A template kept in the database and edited in the admin: ``notify(template=name)``
    renders it (in ``language`` when a variant exists, else the default one, whose
    language is empty)."""

    name = models.CharField(max_length=200, help_text='What notify(template=...) names, e.g. "billing/invoice".')
    language = models.CharField(max_length=35, blank=True, default="", help_text="Empty: the default variant.")
    subject = models.TextField(help_text="Django template language; rendered without HTML escaping.")
    body = models.TextField(blank=True, default="", help_text="The text body; rendered without HTML escaping.")
    html_body = models.TextField(blank=True, default="", help_text="The HTML body (optional); escaped as HTML.")
    sample_context = models.JSONField(blank=True, default=dict, help_text="The context the admin's preview renders.")
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "language"], name="notifications_template_name_language_uniq"),
        ]
        ordering = ["name", "language"]

    def __str__(self) -> str:
        return f"{self.name} ({self.language})" if self.language else self.name

    def clean(self) -> None:
        """What notify() would refuse, refused on save instead: a name it cannot look
        up, a language it does not take, a part that is not a Django template, no body,
        a sample context that is not a JSON object."""
        from django.core.exceptions import ValidationError

        from . import rendering, validation
        from .exceptions import InvalidNotification

        errors: dict[str, str] = {}
        for field, check in (("name", rendering.clean_name), ("language", validation.language)):
            try:
                check(getattr(self, field))
            except InvalidNotification as exc:
                errors[field] = str(exc).split(": ", 1)[-1]
        errors.update(rendering.syntax_errors(subject=self.subject, body=self.body, html_body=self.html_body))
        if not self.body.strip() and not self.html_body.strip():
            errors.setdefault("body", "give a text body, an HTML body, or both")
        if not isinstance(self.sample_context, dict):
            errors["sample_context"] = "must be a JSON object, the context the preview renders with"
        if errors:
            raise ValidationError(errors)


class RateBucket(models.Model):
    """One row per rate-limited email backend: the time its next email may start at
    (a generic cell rate algorithm). In PostgreSQL, whose loss stops sending anyway, so
    that the limit holds across every worker and host, and losing Redis changes nothing."""

    name = models.CharField(max_length=100, primary_key=True)
    next_at = models.DateTimeField(db_default=Now())

    def __str__(self) -> str:
        return self.name


class StreamDelivery(models.Model):
    """How many times a worker began a Kafka delivery message: Kafka counts no
    redeliveries, and a message that kills its worker each time would otherwise replay
    forever. A second start is a replay after a crash (the message is split, as on
    RabbitMQ); past ``NOTIFICATIONS_DELIVERY_LIMIT`` starts its notifications end failed.
    Rows of a partition's earlier offsets are deleted as its later ones begin."""

    topic = models.CharField(max_length=249)
    partition = models.IntegerField()
    offset = models.BigIntegerField()
    # The message's Kafka timestamp (ms): after a broker lost its log, another message
    # comes at the same offset, and its starts are its own.
    message_timestamp = models.BigIntegerField(null=True, blank=True)
    attempts = models.IntegerField(default=1)
    started_at = models.DateTimeField(db_default=Now())

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["topic", "partition", "offset"], name="notifications_stream_offset"),
        ]

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"
