"""The operator's view: notifications with their status, the outbox and the sent-email
records (read-only), and actions that retry through the outbox without ever allowing a
second email for a key that was sent.

Each action names the permission it needs, so Django offers it (and runs it) only for
users who hold it: retrying a failed notification needs the change permission on
Notification; resending or closing a held ambiguous one, which may send a second copy or
suppress an email, needs ``notifications.resolve_ambiguous``; cancelling one not yet sent
needs ``notifications.cancel_notification``. Neither retry nor resend reopens an expired
or a cancelled notification: the one would be sent after its expiry, the other against a
decision.

The lists are built for tables of millions of rows: every search and filter is answered
by an index (no ``LIKE '%...%'``; the backend filter, see ``BackendFilter``, is the one
exception), counts stop at ``COUNT_LIMIT``, and columns do not sort (each sort would be a
sort of the whole table). The on-call dashboard
(``notifications.dashboard``) is a page of the Notification admin."""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator

from . import backends, cancellation, status
from .conf import settings
from .exceptions import InvalidNotification
from .models import ClaimState, EmailTemplate, Notification, OutboxMessage, SentEmail, Status, recipient_reversed
from .requeue import refusals, requeue

COUNT_LIMIT = 10_000  # a list counts its rows up to this many, then says "more than"


class CappedPaginator(Paginator):
    """Counts at most ``COUNT_LIMIT`` + 1 rows: a search or filter matching half a
    million rows costs as much to count as one matching ten thousand."""

    @cached_property
    def count(self) -> int:
        return int(self.object_list[: COUNT_LIMIT + 1].count())  # type: ignore[attr-defined]


def to_the_second(value: datetime | None) -> str:
    """A time as the lists show it: local time, to the second."""
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def truncated(text: str, length: int) -> str:
    """The start of ``text``, the whole of it in the tooltip."""
    if not text:
        return "-"
    return format_html('<span title="{}">{}</span>', text, Truncator(text).chars(length))


class ListAdmin(admin.ModelAdmin):
    """What every list here shares: capped counts, no full count, no facet counts, no
    column sorting."""

    paginator = CappedPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice reads every row
    sortable_by = ()
    list_per_page = 100

    @property
    def count_limit(self) -> int:
        """For the pagination template's "more than"."""
        return COUNT_LIMIT


class ReadOnlyAdmin(ListAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ServiceFilter(admin.AllValuesFieldListFilter):
    """The service filter, its choices read by a skip scan of the service index
    (``status.services``) rather than a DISTINCT over the whole table."""

    def __init__(self, field: Any, request: HttpRequest, params: Any, model: Any, model_admin: Any, field_path: str):
        super().__init__(field, request, params, model, model_admin, field_path)
        # A list where Django keeps a queryset: the filter only iterates it.
        self.lookup_choices = status.services()  # type: ignore[assignment]


class BackendFilter(admin.SimpleListFilter):
    """The email backend filter, its choices the configured names (no DISTINCT over the
    table); offered only when there is more than one. No index answers it: the list's
    walk by id and its capped count stop early unless the backend is a rare one."""

    title = "backend"
    parameter_name = "backend"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = backends.names()
        return [(name, name) for name in names] if len(names) > 1 else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(backend=value) if value else queryset


@admin.register(Notification)
class NotificationAdmin(ListAdmin):
    list_display = (  # the key holds the service and the user_id
        "key",
        "status",
        "priority",
        "to",
        "short_subject",
        "template_shown",
        "backend",
        "short_last_error",
        "attempts",
        "ambiguous_count",
        "created",
        "send_after",
        "expires",
        "sent",
    )
    # Priority: a high one through its partial index (notifications_priority_idx), a
    # normal one, the usual kind, by the list's walk by id.
    list_filter = ("status", "priority", BackendFilter, ("service", ServiceFilter))
    # Searched through indexes only, see get_search_results. No date_hierarchy: its
    # links are a DISTINCT over the dates of every row in the list (a full scan).
    search_fields = ("key",)
    search_help_text = (
        "A key or its beginning (service:notification_id), a notification_id, a user_id, "
        "or the end of a recipient's address (ann@example.com, example.com)."
    )
    readonly_fields = [f.name for f in Notification._meta.fields] + ["message_id"]
    actions = ["retry_failed", "resend_ambiguous", "mark_ambiguous_sent", "cancel_selected"]

    def get_urls(self) -> list[URLPattern]:
        from .dashboard import dashboard_view

        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(lambda request: dashboard_view(self, request)),
            name="notifications_notification_dashboard",
        )
        return [dashboard, *super().get_urls()]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Notification], search_term: str
    ) -> tuple[QuerySet[Notification], bool]:
        """Every alternative is a range of one index: the key's beginning (the pattern
        index on key; a whole key is a beginning too), a notification_id as the key's
        middle, tried for each service (the same index), a user_id (its index) and the
        end of the recipient (the index on the reversed recipient)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q(key__startswith=term) | Q(user_id=term)
        if ":" not in term:
            for service in status.services():
                match |= Q(key__startswith=f"{service}:{term}:")
        if "@" in term or "." in term:
            queryset = queryset.alias(recipient_reversed=recipient_reversed())
            match |= Q(recipient_reversed__startswith=term.lower().rstrip(">")[::-1])
        return queryset.filter(match), False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # The dashboard's failures link to the list of one reason (within the status index).
        return lookup in ("last_error", "last_error__exact") or super().lookup_allowed(lookup, value, request)

    @admin.display(description="subject")
    def short_subject(self, obj: Notification) -> str:
        return truncated(obj.subject, 50)

    @admin.display(description="last error")
    def short_last_error(self, obj: Notification) -> str:
        return truncated(obj.last_error, 60)

    @admin.display(description="created")
    def created(self, obj: Notification) -> str:
        return to_the_second(obj.created_at)

    @admin.display(description="sent")
    def sent(self, obj: Notification) -> str:
        return to_the_second(obj.sent_at)

    @admin.display(description="template")
    def template_shown(self, obj: Notification) -> str:
        """The template and its language, as ``name (language)``."""
        if not obj.template:
            return "-"
        return f"{obj.template} ({obj.language})" if obj.language else obj.template

    @admin.display(description="send at")
    def send_after(self, obj: Notification) -> str:
        return to_the_second(obj.send_at)

    @admin.display(description="expires")
    def expires(self, obj: Notification) -> str:
        return to_the_second(obj.expires_at)

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

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        """Whether the user may cancel notifications (``cancel_notification`` of
        Notification's ``Meta.permissions``). Not the change permission: a cancel stops
        an email a service asked for, for good (no retry reopens a cancelled one), which
        is more than the change permission's retry of a failed one gives; a view-only
        user holds neither."""
        return request.user.has_perm(f"{self.opts.app_label}.cancel_notification")

    def _refused(self, request: HttpRequest, queryset: QuerySet[Notification], status: str, verb: str) -> None:
        """Say which of the selected notifications a retry or resend left alone by
        decision: the expired, the cancelled, those past their expires_at."""
        for sentence in refusals(queryset, status).messages(verb):
            self.message_user(request, sentence, messages.WARNING)

    @admin.action(description="Retry failed notifications through the outbox", permissions=["change"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        self._refused(request, queryset, Status.FAILED, "retried")
        count = requeue(queryset.filter(status=Status.FAILED), [ClaimState.FAILED], Status.CREATED)
        self.message_user(request, f"{count} failed notification(s) queued again.", messages.SUCCESS)

    @admin.action(
        description="Resend held ambiguous notifications (the recipient may get a second copy)",
        permissions=["resolve_ambiguous"],
    )
    def resend_ambiguous(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        self._refused(request, queryset, Status.AMBIGUOUS, "resent")
        count = requeue(queryset.filter(status=Status.AMBIGUOUS), [ClaimState.HELD], Status.CREATED)
        self.message_user(request, f"{count} ambiguous notification(s) queued for resending.", messages.WARNING)

    @admin.action(description="Cancel selected notifications (those not yet sent)", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        """``cancel()`` for each selected key, and one message per verdict: cancelled in
        time, already cancelled, stopped too late to be sure, too late (with the statuses
        found), unknown (purged since the page was drawn)."""
        keys = list(queryset.order_by("id").values_list("key", flat=True))
        who = request.user.get_username() or f"user #{request.user.pk}"
        results = cancellation.cancel_keys(keys, reason=f"cancelled in the admin by {who}")
        for verdict, sentence in cancellation.summary(results):
            level = messages.SUCCESS if verdict in cancellation.STOPPED_IN_TIME else messages.WARNING
            self.message_user(request, sentence, level)

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
    list_display = ("id", "notification", "subject", "created", "due", "published")
    list_filter = (("published_at", admin.EmptyFieldListFilter),)
    search_fields = ("notification__key",)
    search_help_text = "A whole key."
    list_select_related = ("notification",)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[OutboxMessage], search_term: str
    ) -> tuple[QuerySet[OutboxMessage], bool]:
        """The whole key, through its unique index (``=`` in search_fields would compare
        upper-cased keys, which no index answers)."""
        term = search_term.strip()
        return (queryset.filter(notification__key=term) if term else queryset), False

    @admin.display(description="subject")
    def subject(self, obj: OutboxMessage) -> str:
        return truncated(obj.notification.subject, 50)

    @admin.display(description="created")
    def created(self, obj: OutboxMessage) -> str:
        return to_the_second(obj.created_at)

    @admin.display(description="due")
    def due(self, obj: OutboxMessage) -> str:
        return to_the_second(obj.due_at) if obj.due_at else "at once"

    @admin.display(description="published")
    def published(self, obj: OutboxMessage) -> str:
        return to_the_second(obj.published_at)


@admin.register(SentEmail)
class SentEmailAdmin(ReadOnlyAdmin):
    list_display = (
        "key",
        "state",
        "token",
        "attempts",
        "ambiguous_count",
        "owner",
        "short_response",
        "lease_expires",
        "sent",
    )
    list_filter = ("state",)
    search_fields = ("key",)
    search_help_text = "A whole key, or a Message-ID (with or without its angle brackets)."

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[SentEmail], search_term: str
    ) -> tuple[QuerySet[SentEmail], bool]:
        """The key (its unique index) or the Message-ID (its index), whole."""
        term = search_term.strip()
        if not term:
            return queryset, False
        message_id = term if term.startswith("<") else f"<{term}>"
        return queryset.filter(Q(key=term) | Q(message_id=message_id)), False

    @admin.display(description="last reply")
    def short_response(self, obj: SentEmail) -> str:
        return truncated(obj.response, 60)

    @admin.display(description="lease expires")
    def lease_expires(self, obj: SentEmail) -> str:
        return to_the_second(obj.lease_expires_at)

    @admin.display(description="sent")
    def sent(self, obj: SentEmail) -> str:
        return to_the_second(obj.sent_at)


@admin.register(EmailTemplate)
class EmailTemplateAdmin(admin.ModelAdmin):
    """The database's templates (``notify(template=...)``), edited without a deploy. Saving
    refuses a part that is not a Django template (``EmailTemplate.clean``); the preview
    renders a template with its sample context, for anyone who may view it."""

    list_display = ("name", "language", "updated_at")
    search_fields = ("name",)
    search_help_text = "A template's name or part of it."
    list_filter = ("language",)
    fields = ("name", "language", "subject", "body", "html_body", "sample_context", "created_at", "updated_at")
    readonly_fields = ("created_at", "updated_at")

    def get_urls(self) -> list[URLPattern]:
        preview = path(
            "<path:object_id>/preview/",
            self.admin_site.admin_view(self.preview_view),
            name="notifications_emailtemplate_preview",
        )
        return [preview, *super().get_urls()]

    def preview_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Subject, text body and HTML body as notify() would render them from this row,
        or the error it would raise. The HTML goes into a sandboxed iframe's ``srcdoc``:
        no script of it runs, and it cannot reach this page or the admin's origin."""
        from .rendering import render_row

        template = self.get_object(request, unquote(object_id))
        if template is None:
            raise Http404(f"no email template with id {object_id!r}")
        if not self.has_view_permission(request, template):
            raise PermissionDenied
        rendered, error = None, ""
        try:
            rendered = render_row(template, template.sample_context)
        except InvalidNotification as exc:
            error = str(exc).split(": ", 1)[-1]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": template,
            "title": f"Preview: {template}",
            "rendered": rendered,
            "error": error,
        }
        return TemplateResponse(request, "admin/notifications/emailtemplate/preview.html", context)
