"""URLs: the admin is the operator's window onto the pipeline; /healthz and /readyz are
the probes (notifications/health.py)."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("notifications.health")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
