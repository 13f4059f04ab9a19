"""Templates: ``notify(template=...)`` renders subject and bodies with Django's template
engine, in the caller, so the broker message still carries the whole email.

Two sources, asked in this order: an ``EmailTemplate`` row (edited in the admin) of the
name, in the language asked for and then the default one (language ""); then the
caller's own template files through its ``TEMPLATES`` setting:
``{name}/{language}/subject.txt`` and then ``{name}/subject.txt``, beside ``body.txt``
and ``body.html`` in the same folder. Text (the subject and ``body.txt``) is rendered
without HTML escaping, ``body.html`` with it; the language is active while rendering,
so ``{% translate %}`` follows it.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.template import Context, Engine, TemplateDoesNotExist, engines
from django.template.backends.django import DjangoTemplates
from django.utils import translation
from django.utils.html import strip_tags

from .conf import settings
from .exceptions import InvalidNotification

MAX_NAME_LENGTH = 200
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str
    html_body: str


def render(name: Any, context: Any, language: str, using: str) -> Rendered:
    """Render template ``name`` with ``context`` in ``language`` (falling back to the
    default variant). Raises ``InvalidNotification`` naming ``template`` (or ``context``)
    for a template that does not exist, does not compile or fails while rendering."""
    name = check_name(name)
    if context is not None and not isinstance(context, Mapping):
        raise InvalidNotification("context", f"must be a mapping, got {type(context).__name__}")
    values = dict(context or {})
    sources = _stored(name, language, settings.TEMPLATES_DATABASE or using)
    try:
        with _language(language):
            if sources is not None:
                subject, body, html_body = _render_sources(sources, values)
            else:
                subject, body, html_body = _render_files(name, language, values)
    except InvalidNotification:
        raise
    except Exception as exc:  # a syntax error, a failing filter, an error in the caller's object
        raise InvalidNotification("template", f"{name!r} could not be rendered: {type(exc).__name__}: {exc}") from None
    return _finish(subject, body, html_body)


def render_stored(template: Any, context: Mapping[str, Any]) -> Rendered:
    """An ``EmailTemplate`` (saved or not) rendered with ``context``, as notify() would:
    the admin's preview. Raises what rendering raises (a syntax error, say)."""
    with _language(template.language):
        return _finish(*_render_sources((template.subject, template.body, template.html_body), dict(context)))


def _render_sources(sources: tuple[str, str, str], values: dict[str, Any]) -> tuple[str, str, str]:
    engine = _engine()
    subject_source, body_source, html_source = sources
    subject = _render(engine.from_string(subject_source), values, escape=False)
    body = _render(engine.from_string(body_source), values, escape=False) if body_source.strip() else ""
    html_body = _render(engine.from_string(html_source), values, escape=True) if html_source.strip() else ""
    return subject, body, html_body


def compile_source(source: str) -> None:
    """Compile ``source`` as the pipeline will (raises ``TemplateSyntaxError``)."""
    _engine().from_string(source)


def _finish(subject: str, body: str, html_body: str) -> Rendered:
    subject = _WHITESPACE.sub(" ", subject).strip()
    if not body.strip() and html_body.strip():
        body = html.unescape(strip_tags(html_body)).strip()
    return Rendered(subject=subject, body=body, html_body=html_body)


def check_name(name: Any) -> str:
    """A template name: a relative path of plain segments, never one that climbs out of
    a template folder."""
    if not isinstance(name, str):
        raise InvalidNotification("template", f"must be a string, got {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidNotification("template", f"must be 1 to {MAX_NAME_LENGTH} characters long")
    if not _NAME.fullmatch(name) or ".." in name.split("/") or "//" in name or name.endswith("/"):
        raise InvalidNotification(
            "template", f"{name!r} is not a template name (letters, digits, '_', '-', '.', and '/' between parts)"
        )
    return name


def _stored(name: str, language: str, using: str) -> tuple[str, str, str] | None:
    from .models import EmailTemplate

    variants = [language, ""] if language else [""]
    found = {t.language: t for t in EmailTemplate.objects.using(using).filter(name=name, language__in=variants)}
    for variant in variants:
        if variant in found:
            t = found[variant]
            return t.subject, t.body, t.html_body
    return None


def _render_files(name: str, language: str, values: dict[str, Any]) -> tuple[str, str, str]:
    engine = _engine()
    folders = [f"{name}/{language}", name] if language else [name]
    for folder in folders:
        try:
            subject_template = engine.get_template(f"{folder}/subject.txt")
        except TemplateDoesNotExist:
            continue
        body = _optional(engine, f"{folder}/body.txt", values, escape=False)
        html_body = _optional(engine, f"{folder}/body.html", values, escape=True)
        if not body.strip() and not html_body.strip():
            raise InvalidNotification("template", f"{name!r} has a subject but no body.txt or body.html in {folder}/")
        return _render(subject_template, values, escape=False), body, html_body
    looked = ", ".join(f"{folder}/subject.txt" for folder in folders)
    raise InvalidNotification(
        "template", f"{name!r} does not exist (no EmailTemplate of that name, and no template file {looked})"
    )


def _optional(engine: Engine, path: str, values: dict[str, Any], escape: bool) -> str:
    try:
        template = engine.get_template(path)
    except TemplateDoesNotExist:
        return ""
    return _render(template, values, escape)


def _render(template: Any, values: dict[str, Any], escape: bool) -> str:
    """Escaping is the context's (text: off, HTML: on), so ``{% extends %}`` and the
    caller's tags work alike in both."""
    # Plain text, not the SafeString a render returns: what a template rendered is data to
    # whoever shows it next (the admin's preview, the notification's page), never markup
    # trusted as safe.
    return "".join([template.render(Context(values, autoescape=escape))])


@contextlib.contextmanager
def _language(language: str) -> Iterator[None]:
    if not language:
        yield
        return
    with translation.override(language):
        yield


def _engine() -> Engine:
    """The caller's first Django template engine: its folders, loaders and libraries."""
    for backend in engines.all():
        if isinstance(backend, DjangoTemplates):
            return backend.engine
    raise InvalidNotification("template", "TEMPLATES has no Django template engine to render with")
