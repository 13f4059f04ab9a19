"""The admin's email templates: saving refuses what would not compile, and the preview
renders a template with its sample context for anyone who may view it, the HTML in a
sandboxed frame, a rendering error shown as such."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from notifications.models import EmailTemplate
from tests.test_admin import staff

pytestmark = pytest.mark.django_db

ADD = "admin:notifications_emailtemplate_add"
CHANGELIST = "admin:notifications_emailtemplate_changelist"


def preview_url(template: EmailTemplate) -> str:
    return reverse("admin:notifications_emailtemplate_preview", args=[template.pk])


def change_url(template: EmailTemplate) -> str:
    return reverse("admin:notifications_emailtemplate_change", args=[template.pk])


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def invoice(**fields: Any) -> EmailTemplate:
    values = {
        "name": "billing/invoice",
        "subject": "Invoice {{ number }}\nfor {{ name }}",
        "body": "Dear {{ name }}, you owe {{ amount }}.",
        "html_body": '<p onclick="steal()">Dear {{ name }}</p><script>parent.document.title="owned"</script>',
        "sample_context": {"number": 17, "name": "Ann & <Bob>", "amount": "5 EUR"},
    }
    values.update(fields)
    return EmailTemplate.objects.create(**values)


def form(**fields: Any) -> dict[str, str]:
    values = {
        "name": "welcome",
        "language": "",
        "subject": "Welcome {{ name }}",
        "body": "Hello {{ name }}",
        "html_body": "",
        "sample_context": json.dumps({"name": "Ann"}),
    }
    values.update(fields)
    return values


def test_preview_shows_subject_text_and_html_in_a_sandboxed_frame(admin_client: Client) -> None:
    template = invoice()
    response = admin_client.get(preview_url(template))
    assert response.status_code == 200
    page = response.content.decode()
    assert re.search(r'<pre id="preview-subject">Invoice 17 for Ann &amp; &lt;Bob&gt;</pre>', page)
    assert '<pre id="preview-body">Dear Ann &amp; &lt;Bob&gt;, you owe 5 EUR.</pre>' in page
    frame = re.search(r"<iframe ([^>]*)></iframe>", page)
    assert frame is not None
    attributes = frame.group(1)
    assert 'sandbox=""' in attributes  # an empty sandbox: no scripts, a unique origin
    srcdoc = re.search(r'srcdoc="([^"]*)"', attributes)
    assert srcdoc is not None
    # The frame gets exactly the rendered HTML (the template's value escaped within it);
    # none of it is markup of the admin page itself.
    assert html.unescape(srcdoc.group(1)) == (
        '<p onclick="steal()">Dear Ann &amp; &lt;Bob&gt;</p><script>parent.document.title="owned"</script>'
    )
    assert "<script>parent" not in page and 'onclick="steal()"' not in page


def test_change_form_links_to_the_preview(admin_client: Client) -> None:
    template = invoice()
    page = admin_client.get(change_url(template)).content.decode()
    assert f'href="{preview_url(template)}"' in page


def test_preview_of_a_template_that_fails_shows_the_error_not_a_500(admin_client: Client) -> None:
    broken = invoice(name="db/broken", body='{% extends "no/such/base.txt" %}')
    response = admin_client.get(preview_url(broken))
    assert response.status_code == 200
    error = re.search(r'<p class="errornote" id="preview-error">(.*?)</p>', response.content.decode(), re.DOTALL)
    assert error is not None
    assert "could not be rendered: the text body" in error.group(1) and "no/such/base.txt" in error.group(1)
    # Saved past the form (a syntax error): the same.
    unparsable = invoice(name="db/unparsable", subject="{% if %}")
    page = admin_client.get(preview_url(unparsable)).content.decode()
    assert "TemplateSyntaxError" in page and 'id="preview-error"' in page


def test_preview_in_the_templates_language(admin_client: Client) -> None:
    german = invoice(language="de", body='{% load i18n %}{% translate "Home" %}')
    page = admin_client.get(preview_url(german)).content.decode()
    assert '<pre id="preview-body">Start</pre>' in page


def test_a_view_only_user_can_preview_but_not_change(django_user_model: Any) -> None:
    template = invoice()
    client = logged_in(staff(django_user_model, "viewer", "view_emailtemplate"))
    assert client.get(preview_url(template)).status_code == 200
    assert client.get(change_url(template)).status_code == 200  # read-only
    response = client.post(change_url(template), form(name="billing/invoice", subject="Changed"))
    assert response.status_code == 403
    assert EmailTemplate.objects.get(pk=template.pk).subject.startswith("Invoice")
    assert client.post(reverse(ADD), form()).status_code == 403
    assert not EmailTemplate.objects.filter(name="welcome").exists()


def test_without_permission_the_preview_is_refused(django_user_model: Any) -> None:
    template = invoice()
    other = logged_in(staff(django_user_model, "other", "view_notification"))
    assert other.get(preview_url(template)).status_code == 403
    anonymous = Client().get(preview_url(template))
    assert anonymous.status_code == 302 and reverse("admin:login") in anonymous["Location"]


def test_preview_of_no_such_template_is_404(admin_client: Client) -> None:
    assert admin_client.get(reverse("admin:notifications_emailtemplate_preview", args=[999999])).status_code == 404


def test_saving_a_syntax_error_is_a_form_error_on_that_field(admin_client: Client) -> None:
    response = admin_client.post(reverse(ADD), form(body="{% for x in %}", html_body="<p>{% if %}</p>"))
    assert response.status_code == 200  # the form again, with its errors
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"body", "html_body"}
    assert "not a valid Django template" in errors["body"][0]
    assert not EmailTemplate.objects.exists()


def test_saving_checks_name_language_bodies_and_sample_context(admin_client: Client) -> None:
    response = admin_client.post(
        reverse(ADD), form(name="../etc", language="de de", body="", sample_context=json.dumps([1]))
    )
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"name", "language", "body", "sample_context"}
    assert not EmailTemplate.objects.exists()


def test_a_valid_template_is_saved_and_found_by_name(admin_client: Client) -> None:
    response = admin_client.post(reverse(ADD), form(language="de"))
    assert response.status_code == 302, response.context["adminform"].form.errors
    saved = EmailTemplate.objects.get(name="welcome", language="de")
    assert saved.sample_context == {"name": "Ann"}
    listed = admin_client.get(reverse(CHANGELIST), {"q": "welc"})
    assert [t.pk for t in listed.context["cl"].result_list] == [saved.pk]
