"""URLs: the admin is the operator's window onto the pipeline; /healthz and /readyz are
the probes (notifications/health.py)."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from notifications.exposition import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("notifications.health")),
    path("metrics", metrics_view, name="metrics"),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
