"""The on-call dashboard: one admin page that says whether emails are going out, how late,
what failed and why, what waits for later (scheduled sends, retries) and for a person,
how deep the delivery queues are (with Kafka, the delivery topics' lag), with the two
decisions a held ambiguous notification needs.

Every figure comes from ``notifications.status`` (the figures the command line and the
metrics report too), the queues from ``exposition.broker_queues`` (the metrics' passive
declares, under the same short deadline, so a broker that is away costs the page two
seconds, not a hang). The page is served by ``NotificationAdmin`` under the admin site
(``admin/notifications/notification/dashboard/``), so it needs a staff login and the view
permission on Notification; its buttons run the changelist's own actions, offered and
allowed by the same permission checks (``notifications.resolve_ambiguous``).
No script: the chart is SVG drawn here, the page reloads itself with a meta refresh.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from . import exposition, status
from .conf import settings
from .models import Status

if TYPE_CHECKING:
    from .admin import NotificationAdmin

REFRESH_SECONDS = 15
EXACT_COUNTS_UP_TO = status.EXACT_UP_TO  # a status with more shows PostgreSQL's estimate
SHOWN = 50  # held notifications and stuck claims listed (the totals count them all)
ACTIONS = ("resend_ambiguous", "mark_ambiguous_sent")  # the buttons the page may carry
CHART_WIDTH, CHART_HEIGHT, CHART_MINUTES = 720, 140, 60


def dashboard_view(model_admin: NotificationAdmin, request: HttpRequest) -> HttpResponse:
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    if request.method == "POST":
        return _run_action(model_admin, request)
    refresh = _refresh(request)
    changelist = reverse("admin:notifications_notification_changelist")
    counted = status.counts_by_status_bounded(EXACT_COUNTS_UP_TO)
    counts = counted.counts
    backlog = status.backlog()
    scheduled = status.scheduled()
    queues = exposition.broker_queues(timeout=exposition.BROKER_TIMEOUT)
    lag = status.lag()
    per_minute = status.sent_per_minute(CHART_MINUTES)
    held_total = status.held_count()
    stuck_total = status.stuck_claims()
    context: dict[str, Any] = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": "On-call dashboard",
        "refresh": refresh,
        "taken_at": timezone.now(),
        "counts": [
            (label, counts[value], value in counted.estimated, f"{changelist}?{urlencode({'status__exact': value})}")
            for value, label in Status.choices
        ],
        "total": sum(counts.values()),
        "estimated": bool(counted.estimated),
        "exact_up_to": counted.exact_up_to,
        "backlog": backlog,
        "oldest_due_age": duration(backlog.oldest_due_age),
        "outbox_pending_url": reverse("admin:notifications_outboxmessage_changelist") + "?published_at__isnull=True",
        "scheduled": scheduled,
        "next_due_in": duration(scheduled.next_due_in),
        "scheduled_url": f"{changelist}?status__exact={Status.SCHEDULED}",
        "queues": _queues(queues),
        "kafka": settings.BROKER == "kafka",
        "broker_timeout": exposition.BROKER_TIMEOUT,
        "lag": lag,
        "lag_shown": {name: duration(getattr(lag, name)) for name in ("p50", "p99", "max")},
        "chart": chart(per_minute),
        "sent_last_hour": sum(count for _, count in per_minute),
        "failures": [
            (reason, count, f"{changelist}?{urlencode({'status__exact': Status.FAILED, 'last_error': reason})}")
            for reason, count in status.failures_by_reason()
        ],
        "held": status.held(SHOWN) if held_total else [],
        "held_total": held_total,
        "held_url": f"{changelist}?status__exact={Status.AMBIGUOUS}",
        "can_resolve": all(name in model_admin.get_actions(request) for name in ACTIONS),
        "stuck": [(claim, duration(claim.expired_for)) for claim in status.stuck_claim_list(SHOWN)]
        if stuck_total
        else [],
        "stuck_total": stuck_total,
        "shown": SHOWN,
    }
    request.current_app = model_admin.admin_site.name
    return TemplateResponse(request, "admin/notifications/notification/dashboard.html", context)


QUEUE_LABELS = {
    "deliver_high": "deliveries, high priority",
    "deliver": "deliveries",
    "relay": "relay wake-ups and beat's tasks",
    "dead_letter": "dead letters",
    "parked": "parked dead letters (for a person)",
}


def _queues(found: dict[str, tuple[str, int, int]] | None) -> list[dict[str, Any]] | None:
    """The broker's queues as the page lists them (the delivery queues first), or None
    when the broker did not answer."""
    if found is None:
        return None
    return [
        {
            "role": role,
            "label": QUEUE_LABELS.get(role, role),
            "queue": name,
            "ready": ready,
            "consumers": consumers,
            "delivery": role in ("deliver", "deliver_high"),  # no consumer there: nothing is sent
        }
        for role, (name, ready, consumers) in found.items()
    ]


def _run_action(model_admin: NotificationAdmin, request: HttpRequest) -> HttpResponse:
    """Run one of the changelist's actions on the notifications the form names. The
    admin's ``get_actions`` keeps only those the user's permissions allow, so a user
    without ``resolve_ambiguous`` gets 403 here as the changelist would refuse them."""
    name = request.POST.get("action", "")
    action = model_admin.get_actions(request).get(name) if name in ACTIONS else None
    if action is None:
        raise PermissionDenied
    ids = [int(pk) for pk in request.POST.getlist("_selected_action") if pk.isascii() and pk.isdigit()]
    func = action[0]
    func(model_admin, request, model_admin.get_queryset(request).filter(pk__in=ids))
    return HttpResponseRedirect(request.get_full_path())


def _refresh(request: HttpRequest) -> int:
    """Seconds between reloads: ``?refresh=N`` (0 stops them), 15 by default."""
    value = request.GET.get("refresh", "")
    return min(int(value), 3600) if value.isascii() and value.isdigit() else REFRESH_SECONDS


def chart(per_minute: list[tuple[datetime, int]]) -> dict[str, Any]:
    """SVG geometry for sent-per-minute bars (oldest left), scaled to the busiest minute;
    each bar keeps its minute and count for its tooltip and data attributes."""
    top = max((count for _, count in per_minute), default=0)
    width = CHART_WIDTH / max(len(per_minute), 1)
    bars, ticks = [], []
    for i, (minute, count) in enumerate(per_minute):
        height = CHART_HEIGHT * count / top if top else 0.0
        local = timezone.localtime(minute)
        bars.append(
            {
                "x": f"{i * width:.1f}",
                "y": f"{CHART_HEIGHT - height:.1f}",
                "width": f"{max(width - 1, 1):.1f}",
                "height": f"{height:.1f}",
                "minute": local.strftime("%H:%M"),
                "count": count,
            }
        )
        if local.minute % 10 == 0:
            ticks.append({"x": f"{i * width:.1f}", "label": local.strftime("%H:%M")})
    return {
        "bars": bars,
        "ticks": ticks,
        "top": top,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "view_height": CHART_HEIGHT + 18,
    }


def duration(seconds: float | None) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min, 3 d 4 h; a dash for none."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"
