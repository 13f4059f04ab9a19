"""The admin of the database templates: edit, check that they compile, and preview them
rendered with a sample context exactly as ``notify(template=...)`` would."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template import TemplateSyntaxError
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from . import rendering
from .models import EmailTemplate


class EmailTemplateForm(forms.ModelForm):
    class Meta:
        model = EmailTemplate
        fields = ["name", "language", "subject", "body", "html_body", "sample_context"]

    def clean_name(self) -> str:
        from .exceptions import InvalidNotification

        try:
            return rendering.check_name(self.cleaned_data["name"])
        except InvalidNotification as exc:
            raise forms.ValidationError(str(exc).split(": ", 1)[-1]) from None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for field in ("subject", "body", "html_body"):
            try:
                rendering.compile_source(data.get(field) or "")
            except TemplateSyntaxError as exc:
                self.add_error(field, f"does not compile: {exc}")
        if not (data.get("body") or "").strip() and not (data.get("html_body") or "").strip():
            self.add_error("body", "give a text body, an HTML body, or both")
        return data


@admin.register(EmailTemplate)
class EmailTemplateAdmin(admin.ModelAdmin):
    form = EmailTemplateForm
    list_display = ("name", "language", "updated_at", "preview_link")
    list_filter = ("language",)
    search_fields = ("name",)
    ordering = ("name", "language")

    @admin.display(description="preview")
    def preview_link(self, obj: EmailTemplate) -> str:
        url = reverse("admin:notifications_emailtemplate_preview", args=[obj.pk])
        return format_html('<a href="{}">preview</a>', url)

    def get_urls(self) -> list[URLPattern]:
        preview = path(
            "<int:pk>/preview/",
            self.admin_site.admin_view(self.preview_view),
            name="notifications_emailtemplate_preview",
        )
        return [preview, *super().get_urls()]

    def preview_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The template rendered with its sample context. The HTML body is shown in a
        sandboxed frame (no scripts, no same origin), so a template's HTML never runs
        with the admin's session."""
        template = get_object_or_404(EmailTemplate, pk=pk)
        if not self.has_view_permission(request, template):
            raise PermissionDenied
        rendered, error = None, ""
        try:
            rendered = rendering.render_stored(template, template.sample_context or {})
        except Exception as exc:  # a preview shows the error instead of failing
            error = f"{type(exc).__name__}: {exc}"
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Preview of {template}",
            "template_obj": template,
            "rendered": rendered,
            "error": error,
        }
        return TemplateResponse(request, "admin/notifications/emailtemplate/preview.html", context)
