"""notify(template=...): the caller's template files and the admin's database templates,
rendered in the caller, with language variants; a missing or broken template is
refused naming the template, and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest

from notifications import InvalidNotification, notify
from notifications.models import EmailTemplate, Notification, OutboxMessage
from tests.conftest import notification_kwargs, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CONTEXT = {"number": "2026-17", "name": "Zoë <b>&", "amount": "12 €"}


def templated(**overrides: Any) -> dict[str, Any]:
    kwargs = notification_kwargs(**overrides)
    del kwargs["subject"], kwargs["body"]
    return kwargs


def test_file_templates_render_subject_text_and_html_with_escaping_only_in_html():
    n = notify(**templated(), template="tests/invoice", context=CONTEXT)
    assert n.subject == "Invoice 2026-17 for Zoë <b>&"  # one line, not escaped
    assert n.body == "Dear Zoë <b>&, you owe 12 €.\n-- \nThe billing team\n"  # {% extends %}, not escaped
    assert n.html_body == "<p>Dear Zoë &lt;b&gt;&amp;, you owe <b>12 €</b>.</p>\n"
    assert (n.template, n.language) == ("tests/invoice", "")


def test_a_language_variant_and_the_fallback_to_the_default():
    de = notify(**templated(), template="tests/invoice", context=CONTEXT, language="de")
    assert de.subject == "Rechnung 2026-17" and de.body.startswith("Hallo Zoë")
    assert de.html_body == ""  # the variant's folder is used whole, never mixed with the default's
    fr = notify(**templated(), template="tests/invoice", context=CONTEXT, language="fr")
    assert fr.subject.startswith("Invoice") and fr.language == "fr"


def test_an_html_only_template_gets_a_text_body():
    n = notify(**templated(), template="tests/htmlonly", context={"name": "Ann"})
    assert n.body == "Hello & welcome, Ann"


def test_database_templates_come_first_with_language_fallback():
    EmailTemplate.objects.create(name="tests/invoice", subject="DB {{ number }}", body="Body {{ name }}")
    EmailTemplate.objects.create(
        name="tests/invoice", language="de", subject="DB-de {{ number }}", body="Text", html_body="<i>{{ name }}</i>"
    )
    assert notify(**templated(), template="tests/invoice", context=CONTEXT).subject == "DB 2026-17"
    de = notify(**templated(), template="tests/invoice", context=CONTEXT, language="de")
    assert de.subject == "DB-de 2026-17" and de.html_body == "<i>Zoë &lt;b&gt;&amp;</i>"
    assert notify(**templated(), template="tests/invoice", context=CONTEXT, language="it").subject == "DB 2026-17"


def test_a_repeat_after_the_template_was_edited_returns_the_notification():
    EmailTemplate.objects.create(name="tests/edited", subject="First {{ number }}", body="b")
    kwargs = templated()
    first = notify(**kwargs, template="tests/edited", context=CONTEXT)
    EmailTemplate.objects.filter(name="tests/edited").update(subject="Second {{ number }}")
    again = notify(**kwargs, template="tests/edited", context=CONTEXT)
    assert again.pk == first.pk and again.subject == "First 2026-17"


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"template": "tests/nothing"}, "template", "does not exist"),
        ({"template": "tests/broken"}, "template", "could not be rendered"),
        ({"template": "../settings"}, "template", "is not a template name"),
        ({"template": "/etc/passwd"}, "template", "is not a template name"),
        ({"template": ""}, "template", "characters long"),
        ({"template": 7}, "template", "must be a string"),
        ({"template": "tests/invoice", "context": ["a"]}, "context", "mapping"),
        ({"template": "tests/invoice", "subject": "x"}, "template", "not both"),
    ],
)
def test_a_bad_template_is_refused_naming_it_and_nothing_is_written(kwargs, field, words):
    with pytest.raises(InvalidNotification) as caught:
        notify(**templated(), **kwargs)
    assert caught.value.field == field and words in str(caught.value)
    assert not Notification.objects.exists() and not OutboxMessage.objects.exists()


def test_an_exception_while_rendering_is_refused_naming_the_template():
    class Exploding:
        def __str__(self) -> str:
            raise RuntimeError("the caller's object failed")

    with pytest.raises(InvalidNotification) as caught:
        notify(**templated(), template="tests/invoice", context={**CONTEXT, "name": Exploding()})
    assert caught.value.field == "template" and "RuntimeError" in str(caught.value)
    assert not Notification.objects.exists()


def test_a_rendered_subject_that_breaks_the_header_rules_is_the_templates_error():
    EmailTemplate.objects.create(name="tests/bad-subject", subject="{{ x }}", body="b")
    with pytest.raises(InvalidNotification) as caught:
        notify(**templated(), template="tests/bad-subject", context={"x": "=?utf-8?q?x?="})
    assert caught.value.field == "template" and "subject" in str(caught.value)


def test_a_templated_notification_arrives_rendered(smtp_server, workers):
    workers.start(concurrency=1)
    n = notify(**templated(), template="tests/invoice", context=CONTEXT)
    [received] = smtp_server.wait_received(n.key)
    message = received.message
    assert message["Subject"] == "Invoice 2026-17 for Zoë <b>&"
    parts = {part.get_content_type(): part.get_content() for part in message.walk() if not part.is_multipart()}
    assert parts["text/plain"].startswith("Dear Zoë <b>&, you owe 12 €.")
    assert "&lt;b&gt;&amp;" in parts["text/html"]
    wait_for(lambda: Notification.objects.filter(key=n.key, status="sent").exists())
