"""notify(template=...): the caller's template files and the database's templates, with
language variants, escaping by part, and every failure refused as the template's error
with nothing written; end to end, the mail server receives what was rendered."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils.safestring import SafeData

from notifications import InvalidNotification, notify, notify_many
from notifications.models import EmailTemplate, Notification, OutboxMessage, SentEmail
from notifications.rendering import render, text_from_html
from tests.conftest import notification_kwargs, wait_for

INVOICE = {"number": "2024-17", "name": "Ann", "amount": "12 EUR"}


def templated(**overrides: Any) -> dict[str, Any]:
    """notify() arguments with a template instead of subject and body."""
    kwargs = notification_kwargs(**overrides)
    if "subject" not in overrides:
        del kwargs["subject"]
    if "body" not in overrides:
        del kwargs["body"]
    return kwargs


def refused(field: str, **kwargs: Any) -> str:
    """The message of the InvalidNotification that notify(**kwargs) raises, naming
    ``field``; and nothing was written."""
    with pytest.raises(InvalidNotification) as caught:
        notify(**templated(**kwargs))
    assert caught.value.field == field, caught.value
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()
    return str(caught.value)


# Template files: the caller's TEMPLATES directories.


@pytest.mark.django_db
def test_file_template_renders_subject_text_and_html_with_extends() -> None:
    n = notify(**templated(template="billing/invoice", context=INVOICE))
    stored = Notification.objects.get(pk=n.pk)
    assert stored.subject == "Invoice 2024-17 for Ann"
    assert stored.body == "Dear Ann, you owe 12 EUR.\n-- \nHome: https://billing.example.com/"
    assert stored.html_body.startswith("<html><head><title>Invoice</title>")
    assert "<p>Dear Ann, you owe 12 EUR.</p></body></html>" in stored.html_body
    assert (stored.template, stored.language) == ("billing/invoice", "")
    assert OutboxMessage.objects.filter(notification=stored).count() == 1


@pytest.mark.django_db
def test_language_variant_files_are_chosen_and_the_default_is_the_fallback() -> None:
    german = notify(**templated(template="billing/invoice", context=INVOICE, language="de"))
    assert (german.subject, german.body, german.html_body) == (
        "Rechnung 2024-17 für Ann",
        "Hallo Ann, Sie schulden 12 EUR.",
        "",
    )
    assert german.language == "de"
    # de-at has no directory of its own: de is next.
    assert notify(**templated(template="billing/invoice", context=INVOICE, language="de-at")).subject.startswith(
        "Rechnung"
    )
    # No French variant: the default files, rendered in French ({% translate %}).
    french = notify(**templated(template="billing/invoice", context=INVOICE, language="fr"))
    assert french.subject == "Invoice 2024-17 for Ann"
    assert french.body.endswith("Accueil: https://billing.example.com/")


@pytest.mark.django_db
def test_escaping_html_body_escapes_and_text_parts_do_not_also_through_extends() -> None:
    hostile = {"number": "<b>&", "name": "<script>alert(1)</script>", "amount": "\"5\" & 'more'"}
    n = notify(**templated(template="billing/invoice", context=hostile))
    assert n.subject == "Invoice <b>& for <script>alert(1)</script>"
    assert n.body.startswith("Dear <script>alert(1)</script>, you owe \"5\" & 'more'.")
    assert "<p>Dear &lt;script&gt;alert(1)&lt;/script&gt;, you owe &quot;5&quot; &amp; &#x27;more&#x27;.</p>" in (
        n.html_body
    )
    assert "<script>" not in n.html_body
    rendered = render("billing/invoice", hostile, "", "default")
    # Rendered text is data, never markup marked safe: a page showing it escapes it.
    assert not any(isinstance(part, SafeData) for part in (rendered.subject, rendered.body, rendered.html_body))


@pytest.mark.django_db
def test_html_only_template_gets_a_text_body_from_its_html() -> None:
    n = notify(**templated(template="welcome", context={"name": "Ann", "code": "<b>&"}))
    assert n.body == "Hello Ann\nTom & Jerry say hi.\nYour code: <b>&"
    assert "Your code: &lt;b&gt;&amp;" in n.html_body
    assert text_from_html("<p>One</p><p>Two<br>Three</p>") == "One\nTwo\nThree"


@pytest.mark.django_db
def test_subject_whitespace_and_line_breaks_collapse_to_one_line() -> None:
    n = notify(**templated(template="multiline", context={"first": "Hello\r\nBcc: eve@example.com", "second": "you"}))
    assert n.subject == "Hello Bcc: eve@example.com you end"


# Database templates.


@pytest.mark.django_db
def test_database_template_with_language_variant_and_default_fallback() -> None:
    EmailTemplate.objects.create(name="db/receipt", subject="Receipt {{ n }}", body="Thanks, {{ who }}.")
    EmailTemplate.objects.create(
        name="db/receipt",
        language="de",
        subject="Quittung {{ n }}",
        body="Danke, {{ who }}.",
        html_body="<i>{{ who }}</i>",
    )
    context = {"n": 5, "who": "<Ann>"}
    german = notify(**templated(template="db/receipt", context=context, language="de"))
    assert (german.subject, german.body, german.html_body) == ("Quittung 5", "Danke, <Ann>.", "<i>&lt;Ann&gt;</i>")
    for language in (None, "fr", "de_x"):  # no variant (de_x is tried as de first)
        n = notify(**templated(template="db/receipt", context=context, language=language))
        assert n.subject == ("Quittung 5" if language == "de_x" else "Receipt 5")
    assert render("db/receipt", context, "pt-br", "default").body == "Thanks, <Ann>."


@pytest.mark.django_db
def test_a_database_template_is_found_before_files_of_the_same_name() -> None:
    EmailTemplate.objects.create(name="billing/invoice", subject="From the database {{ number }}", body="db body")
    n = notify(**templated(template="billing/invoice", context=INVOICE))
    assert (n.subject, n.body, n.html_body) == ("From the database 2024-17", "db body", "")


@pytest.mark.django_db
def test_database_template_may_extend_the_callers_files() -> None:
    EmailTemplate.objects.create(
        name="db/extends",
        subject="{{ number }}",
        body='{% extends "billing/base.txt" %}{% block content %}Edited {{ name }} & co{% endblock %}',
    )
    n = notify(**templated(template="db/extends", context=INVOICE))
    assert n.body == "Edited Ann & co\n-- \nHome: https://billing.example.com/"


@pytest.mark.django_db
def test_templates_database_setting_is_where_database_templates_are_read() -> None:
    EmailTemplate.objects.create(name="db/elsewhere", subject="Here", body="here")
    with override_settings(NOTIFICATIONS_TEMPLATES_DATABASE="no-such-alias"), pytest.raises(Exception, match="no-such"):
        render("db/elsewhere", {}, "", "default")
    with override_settings(NOTIFICATIONS_TEMPLATES_DATABASE="default"):
        assert render("db/elsewhere", {}, "", "default").subject == "Here"


# Failures: the template's error, nothing written.


@pytest.mark.django_db
def test_missing_template_names_the_template_and_where_it_was_looked_for() -> None:
    message = refused("template", template="no/such/thing", context={}, language="de")
    assert "'no/such/thing' does not exist" in message
    assert "no/such/thing/de/subject.txt" in message and "no/such/thing/subject.txt" in message
    assert "database 'default'" in message


@pytest.mark.django_db
def test_syntax_error_in_a_file_is_refused() -> None:
    message = refused("template", template="broken/syntax")
    assert "'broken/syntax' could not be rendered" in message and "TemplateSyntaxError" in message
    assert "broken/syntax/subject.txt" in message


@pytest.mark.django_db
def test_syntax_error_in_a_database_template_is_refused() -> None:
    EmailTemplate.objects.create(name="db/broken", subject="ok", body="{% for x in %}")
    message = refused("template", template="db/broken")
    assert "could not be rendered: the text body (the database, default language): TemplateSyntaxError" in message


class Exploding:
    @property
    def total(self) -> str:
        raise ZeroDivisionError("the caller's object failed")


@pytest.mark.django_db
def test_an_exception_while_rendering_is_refused_as_the_templates() -> None:
    EmailTemplate.objects.create(name="db/explodes", subject="Total {{ order.total }}", body="b")
    message = refused("template", template="db/explodes", context={"order": Exploding()})
    assert "'db/explodes' could not be rendered: the subject" in message
    assert "ZeroDivisionError: the caller's object failed" in message


@pytest.mark.django_db
def test_a_missing_parent_is_a_rendering_error_not_a_missing_template() -> None:
    message = refused("template", template="broken/parent")
    assert "could not be rendered" in message and "broken/no-such-base.txt" in message


@pytest.mark.django_db
def test_a_subject_without_a_body_is_refused() -> None:
    assert "neither a body.txt nor a body.html" in refused("template", template="broken/nobody")


@pytest.mark.django_db
def test_a_rendered_field_the_checks_refuse_is_the_templates_error() -> None:
    EmailTemplate.objects.create(name="db/empty-subject", subject="{{ nothing }}", body="b")
    assert "rendered a subject that must not be empty" in refused("template", template="db/empty-subject")
    EmailTemplate.objects.create(name="db/control", subject="a{{ c }}b", body="b")
    assert "control characters" in refused("template", template="db/control", context={"c": "\x07"})


@pytest.mark.django_db
@pytest.mark.parametrize("context", [["a"], "name=Ann", 5, ("x",)])
def test_context_must_be_a_mapping(context: Any) -> None:
    assert "must be a mapping" in refused("context", template="billing/invoice", context=context)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "name",
    [
        "",
        5,
        ["billing/invoice"],
        "../settings",
        "billing/../../etc",
        "/etc/passwd",
        "billing//invoice",
        "billing/invoice/",
        "./billing",
        "billing\\invoice",
        "C:/templates/x",
        "billing/invoice\n",
        "bill\x00ing",
        "bill\u2028ing",
        "x" * 201,
    ],
)
def test_hostile_template_names_are_refused(name: Any) -> None:
    refused("template", template=name, context={})


@pytest.mark.django_db
def test_a_template_with_subject_or_body_is_refused() -> None:
    assert "not both" in refused("template", template="billing/invoice", subject="Hi")


@pytest.mark.django_db
def test_one_bad_template_in_a_batch_writes_nothing() -> None:
    good = templated(template="billing/invoice", context=INVOICE)
    bad = templated(template="no/such")
    with pytest.raises(InvalidNotification) as caught:
        notify_many([good, bad])
    assert caught.value.field == "items[1].template"
    assert not Notification.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_refused_template_leaves_the_callers_transaction_usable() -> None:
    with transaction.atomic():
        with pytest.raises(InvalidNotification):
            notify(**templated(template="broken/syntax"))
        n = notify(**templated(template="billing/invoice", context=INVOICE))
    assert list(Notification.objects.values_list("pk", flat=True)) == [n.pk]


# Repeats: compared by template and language, not by what it rendered.


@pytest.mark.django_db(transaction=True)
def test_repeat_after_the_template_was_edited_returns_the_existing_notification(smtp_server, module_worker) -> None:
    template = EmailTemplate.objects.create(name="db/repeat", subject="First {{ n }}", body="one")
    kwargs = templated(template="db/repeat", context={"n": 1})
    first = notify(**kwargs)
    [received] = smtp_server.wait_received(first.key)
    assert received.message["Subject"] == "First 1"
    wait_for(lambda: Notification.objects.filter(key=first.key, status="sent").exists(), what="sent")

    template.subject = "Second {{ n }}"
    template.save()
    again = notify(**kwargs)  # no NotificationConflict: the same template and language
    assert again.pk == first.pk and again.subject == "First 1"
    assert Notification.objects.filter(key=first.key).count() == 1
    assert OutboxMessage.objects.filter(notification_id=first.pk).count() == 1
    assert smtp_server.count(first.key) == 1

    from notifications import NotificationConflict

    with pytest.raises(NotificationConflict) as caught:  # another language is other content
        notify(**{**kwargs, "language": "de"})
    assert caught.value.fields == ("language",)


# End to end: the mail server receives the rendered email.


@pytest.mark.django_db(transaction=True)
def test_templated_notify_arrives_rendered_with_text_and_html_parts(smtp_server, module_worker) -> None:
    n = notify(**templated(template="billing/invoice", context={**INVOICE, "name": "Ann & <Bob>"}))
    [received] = smtp_server.wait_received(n.key)
    assert received.message["Subject"] == "Invoice 2024-17 for Ann & <Bob>"
    text = received.message.get_body(("plain",)).get_content()
    assert text.startswith("Dear Ann & <Bob>, you owe 12 EUR.")
    html = received.message.get_body(("html",)).get_content()
    assert "<p>Dear Ann &amp; &lt;Bob&gt;, you owe 12 EUR.</p>" in html
    n = wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").first(), what="status sent")
    assert SentEmail.objects.get(key=n.key).state == "sent"


@pytest.mark.django_db
def test_a_repeat_after_its_template_was_deleted_returns_the_notification() -> None:
    """Review: a repeat rendered the template again before finding the key, so a caller
    retrying after an unclear commit was told the notification was refused when it was
    queued (and is sent once)."""
    from notifications import notify
    from notifications.models import EmailTemplate, Notification
    from tests.conftest import notification_kwargs

    EmailTemplate.objects.create(name="gone/soon", subject="Hi {{ n }}", body="b")
    kwargs = notification_kwargs()
    del kwargs["subject"], kwargs["body"]
    first = notify(**kwargs, template="gone/soon", context={"n": 1})
    EmailTemplate.objects.filter(name="gone/soon").delete()
    assert notify(**kwargs, template="gone/soon", context={"n": 1}).pk == first.pk
    assert Notification.objects.filter(key=first.key).count() == 1
