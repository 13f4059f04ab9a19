"""The admin of database templates: a preview rendered as notify() renders, in a
sandboxed frame; templates that do not compile are refused; permissions hold."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from notifications.models import EmailTemplate
from tests.test_admin import staff

pytestmark = pytest.mark.django_db

ADD = "admin:notifications_emailtemplate_add"


def preview_url(template: EmailTemplate) -> str:
    return reverse("admin:notifications_emailtemplate_preview", args=[template.pk])


def make() -> EmailTemplate:
    return EmailTemplate.objects.create(
        name="billing/invoice",
        language="de",
        subject="Rechnung {{ number }}",
        body="Hallo {{ name }}",
        html_body="<p>Hallo {{ name }}</p><script>alert(1)</script>",
        sample_context={"number": 17, "name": "Zoë <b>"},
    )


def test_the_preview_shows_what_notify_would_render(admin_client: Client) -> None:
    template = make()
    page = admin_client.get(preview_url(template)).content.decode()
    assert '<pre id="preview-subject">Rechnung 17</pre>' in page
    assert '<pre id="preview-body">Hallo Zoë &lt;b&gt;</pre>' in page  # text as text, shown escaped
    # The HTML runs in a frame with no permissions at all: its script never sees the admin.
    assert 'sandbox=""' in page and "srcdoc=" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page


def test_a_template_that_fails_to_render_shows_the_error_not_a_500(admin_client: Client) -> None:
    template = make()
    EmailTemplate.objects.filter(pk=template.pk).update(body="{{ name|nosuchfilter }}")
    response = admin_client.get(preview_url(template))
    assert response.status_code == 200 and "cannot be rendered" in response.content.decode()


def test_saving_a_template_that_does_not_compile_is_refused(admin_client: Client) -> None:
    response = admin_client.post(
        reverse(ADD),
        {
            "name": "welcome",
            "language": "",
            "subject": "Hi {% if %}",
            "body": "b",
            "html_body": "",
            "sample_context": "{}",
        },
    )
    assert response.status_code == 200 and "does not compile" in response.content.decode()
    assert not EmailTemplate.objects.exists()
    response = admin_client.post(
        reverse(ADD),
        {"name": "../up", "language": "", "subject": "Hi", "body": "b", "html_body": "", "sample_context": "{}"},
    )
    assert "is not a template name" in response.content.decode() and not EmailTemplate.objects.exists()
    response = admin_client.post(
        reverse(ADD),
        {"name": "welcome", "language": "", "subject": "Hi", "body": "b", "html_body": "", "sample_context": "{}"},
    )
    assert response.status_code == 302 and EmailTemplate.objects.get().name == "welcome"


def test_a_viewer_may_preview_but_not_change_and_others_may_not_preview(client: Client, django_user_model: Any) -> None:
    template = make()
    client.force_login(staff(django_user_model, "viewer", "view_emailtemplate"))
    assert client.get(preview_url(template)).status_code == 200
    change = reverse("admin:notifications_emailtemplate_change", args=[template.pk])
    client.post(change, {"name": "x", "language": "", "subject": "changed", "body": "b", "sample_context": "{}"})
    assert EmailTemplate.objects.get(pk=template.pk).subject == "Rechnung {{ number }}"
    client.force_login(staff(django_user_model, "clerk", "view_notification"))
    assert client.get(preview_url(template)).status_code == 403
