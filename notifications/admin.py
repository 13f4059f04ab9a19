"""The operator's view: notifications with their status, the outbox and the sent-email
records (read-only), and actions that retry through the outbox without ever allowing a
second email for a key that was sent.

Each action names the permission it needs, so Django offers it (and runs it) only for
users who hold it: retrying a failed notification needs the change permission on
Notification; resending or closing a held ambiguous one, which may send a second copy or
suppress an email, needs ``notifications.resolve_ambiguous``."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from .conf import settings
from .models import ClaimState, Notification, OutboxMessage, SentEmail, Status
from .requeue import requeue


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = (
        "key",
        "status",
        "service",
        "user_id",
        "to",
        "attempts",
        "ambiguous_count",
        "created_at",
        "sent_at",
    )
    list_filter = ("status", "service")
    search_fields = ("=key", "key", "=user_id", "to")
    date_hierarchy = "created_at"
    list_per_page = 100
    show_full_result_count = False
    readonly_fields = [f.name for f in Notification._meta.fields] + ["message_id"]
    actions = ["retry_failed", "resend_ambiguous", "mark_ambiguous_sent"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The change permission allows the changelist's retry action; a notification's
        # own page stays read-only, since saving it would write back every column as it
        # was read, over whatever a worker recorded in between.
        return obj is None and super().has_change_permission(request, obj)

    def has_resolve_ambiguous_permission(self, request: HttpRequest) -> bool:
        """Whether the user may resend or close held ambiguous notifications (the
        ``resolve_ambiguous`` permission of Notification's ``Meta.permissions``)."""
        return request.user.has_perm(f"{self.opts.app_label}.resolve_ambiguous")

    @admin.action(description="Retry failed notifications through the outbox", permissions=["change"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        count = requeue(queryset.filter(status=Status.FAILED), [ClaimState.FAILED], Status.CREATED)
        self.message_user(request, f"{count} failed notification(s) queued again.", messages.SUCCESS)

    @admin.action(
        description="Resend held ambiguous notifications (the recipient may get a second copy)",
        permissions=["resolve_ambiguous"],
    )
    def resend_ambiguous(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        count = requeue(queryset.filter(status=Status.AMBIGUOUS), [ClaimState.HELD], Status.CREATED)
        self.message_user(request, f"{count} ambiguous notification(s) queued for resending.", messages.WARNING)

    @admin.action(
        description="Mark held ambiguous notifications as sent (no resend)",
        permissions=["resolve_ambiguous"],
    )
    def mark_ambiguous_sent(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        db = settings.DATABASE
        with transaction.atomic(using=db):
            keys = list(queryset.filter(status=Status.AMBIGUOUS).values_list("key", flat=True))
            held = list(
                SentEmail.objects.using(db)
                .select_for_update()
                .filter(key__in=keys, state=ClaimState.HELD)
                .values_list("key", flat=True)
            )
            SentEmail.objects.using(db).filter(key__in=held).update(state=ClaimState.SENT)
            # Only those whose record was held: one being resent must not be called sent.
            count = (
                Notification.objects.using(db).filter(key__in=held, status=Status.AMBIGUOUS).update(status=Status.SENT)
            )
        self.message_user(request, f"{count} notification(s) marked as sent.", messages.SUCCESS)


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "notification", "created_at", "published_at")
    list_filter = (("published_at", admin.EmptyFieldListFilter),)
    search_fields = ("=notification__key",)
    list_select_related = ("notification",)
    show_full_result_count = False


@admin.register(SentEmail)
class SentEmailAdmin(ReadOnlyAdmin):
    list_display = ("key", "state", "token", "attempts", "ambiguous_count", "owner", "lease_expires_at", "sent_at")
    list_filter = ("state",)
    search_fields = ("=key", "key", "message_id")
    show_full_result_count = False
