"""Templates: ``notify(template=...)`` renders subject and bodies with Django's template
engine, in the caller, so the broker message still carries the whole email.

Two sources, looked at in this order: the database's ``EmailTemplate`` rows (edited in
the admin), then the caller's own template files (``{name}/subject.txt``,
``{name}/body.txt``, ``{name}/body.html``) through the Django template engines of its
``TEMPLATES`` setting. A language picks a variant (``de-at``, then ``de``, then the
default one) and is active while rendering, so ``{% translate %}`` speaks it.

The subject and the text body are rendered without HTML escaping, the HTML body with
it. Escaping is a property of the render context (``Context(autoescape=...)``), not of
the source, so it holds through ``{% extends %}`` and ``{% include %}`` too.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.template import Context, Engine, Template, TemplateDoesNotExist, TemplateSyntaxError, engines
from django.template.backends.django import DjangoTemplates
from django.utils import translation
from django.utils.html import strip_tags

from .conf import settings
from .exceptions import InvalidNotification

if TYPE_CHECKING:
    from .models import EmailTemplate

MAX_NAME_LENGTH = 200  # EmailTemplate.name's column
FILES = {"subject": "subject.txt", "body": "body.txt", "html_body": "body.html"}


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str
    html_body: str


class _Failure(Exception):
    """A source that exists but does not compile or render; the message says which part."""


@dataclass(frozen=True)
class _Source:
    """One variant of a template, compiled: a subject and at least one body."""

    where: str  # for messages: "the database (language 'de')", "the files billing/invoice/de/"
    subject: Template
    body: Template | None
    html_body: Template | None


def render(name: Any, context: Any, language: str, using: str) -> Rendered:
    """Render the template ``name`` with ``context`` in ``language`` ("" for none).

    The database's templates are read from ``NOTIFICATIONS_TEMPLATES_DATABASE`` (else
    ``using``). Raises ``InvalidNotification`` naming ``template`` (a bad name, no such
    template, a syntax error, any exception while rendering) or ``context`` (not a
    mapping). A database error is not the template's fault and propagates as it is.
    """
    name = clean_name(name)
    values = clean_context(context)
    variants = languages(language)
    database = settings.TEMPLATES_DATABASE or using
    row = _database_row(name, variants, database)
    with translation.override(language) if language else nullcontext():
        try:
            source = _compile_row(row) if row is not None else _find_files(name, variants)
            if source is None:
                files = ", ".join(_prefix(name, v) + FILES["subject"] for v in variants)
                raise InvalidNotification(
                    "template",
                    f"{name!r} does not exist (looked in the database {database!r} for languages "
                    f"{variants!r} and for the files {files} in the TEMPLATES directories)",
                )
            return _render(source, values)
        except _Failure as exc:
            raise InvalidNotification("template", f"{name!r} could not be rendered: {exc}") from None


def render_row(row: EmailTemplate, context: Any) -> Rendered:
    """One database template exactly as it is (no language fallback), in its language:
    what the admin's preview shows. Raises ``InvalidNotification`` as ``render()``."""
    values = clean_context(context)
    with translation.override(row.language) if row.language else nullcontext():
        try:
            return _render(_compile_row(row), values)
        except _Failure as exc:
            raise InvalidNotification("template", f"{row.name!r} could not be rendered: {exc}") from None


def syntax_errors(**sources: str) -> dict[str, str]:
    """For each given source (field name to template text), the syntax error that keeps
    it from compiling, if any: what the admin refuses to save."""
    found = {}
    for field, text in sources.items():
        try:
            _engine().from_string(text)
        except TemplateSyntaxError as exc:
            found[field] = f"not a valid Django template: {exc}"
    return found


def clean_name(name: Any) -> str:
    """A template name is a relative path of plain segments, so that it can only name a
    file below a template directory (never ``..``, an absolute path or a drive)."""
    if not isinstance(name, str) or not name:
        raise InvalidNotification("template", f"must be a template name such as 'billing/invoice', got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNotification("template", f"is {len(name)} characters long, the limit is {MAX_NAME_LENGTH}")
    if any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name):
        raise InvalidNotification("template", f"{name!r} must not contain control characters or line breaks")
    if "\\" in name or ":" in name or ".." in name or any(s in ("", ".") for s in name.split("/")):
        why = "no '..', '\\', ':' or empty parts"
        raise InvalidNotification("template", f"{name!r} must be a relative path such as 'billing/invoice' ({why})")
    return name


def clean_context(context: Any) -> dict[str, Any]:
    """The context as a new dict: rendering may add names to it (``{% regroup %}``), and
    each part starts again from what the caller gave."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise InvalidNotification("context", f"must be a mapping (a dict), got {type(context).__name__}")
    return dict(context)


def languages(language: str) -> list[str]:
    """The variants to try, most specific first: ``pt-br``, ``pt``, the default ("")."""
    found = [language] if language else []
    primary = re.split(r"[-_]", language, maxsplit=1)[0]
    if primary and primary not in found:
        found.append(primary)
    return [*found, ""]


def text_from_html(markup: str) -> str:
    """A text body for a template that has only an HTML one: the visible text, with line
    breaks where blocks end, entities decoded (it is not HTML any more)."""
    markup = _INVISIBLE.sub("", markup)
    markup = _BLOCK_END.sub("\n", markup)
    lines = [line.strip() for line in html.unescape(strip_tags(markup)).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_INVISIBLE = re.compile(r"<(head|style|script|title)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BLOCK_END = re.compile(r"<br\s*/?>|</(p|div|h[1-6]|li|tr|table|ul|ol|blockquote|pre)\s*>", re.IGNORECASE)


def _render(source: _Source, values: dict[str, Any]) -> Rendered:
    subject = _part(source.subject, values, False, f"the subject ({source.where})")
    body = _part(source.body, values, False, f"the text body ({source.where})") if source.body else ""
    html_body = _part(source.html_body, values, True, f"the HTML body ({source.where})") if source.html_body else ""
    if not body.strip() and html_body:
        body = text_from_html(html_body)
    # A line break in a header would be a header injection (refused), so the subject is
    # one line: every run of whitespace, line breaks included, is one space.
    return Rendered(subject=" ".join(subject.split()), body=body.strip(), html_body=html_body.strip())


def _part(template: Template, values: dict[str, Any], autoescape: bool, where: str) -> str:
    try:
        # A plain str, not the SafeString a render returns: what a template rendered is
        # data to whoever shows it next (the admin's pages), never markup trusted as safe.
        return str.__str__(template.render(Context(dict(values), autoescape=autoescape)))
    except Exception as exc:  # whatever a tag, a filter or a context value raised
        raise _Failure(f"{where}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _database_row(name: str, variants: list[str], database: str) -> EmailTemplate | None:
    from .models import EmailTemplate

    rows = {row.language: row for row in EmailTemplate.objects.using(database).filter(name=name, language__in=variants)}
    return next((rows[v] for v in variants if v in rows), None)


def _compile_row(row: EmailTemplate) -> _Source:
    where = f"the database, language {row.language!r}" if row.language else "the database, default language"
    engine = _engine()

    def compiled(text: str, part: str) -> Template | None:
        if not text.strip():
            return None
        try:
            return engine.from_string(text)
        except TemplateSyntaxError as exc:
            raise _Failure(f"the {part} ({where}): {_describe(exc)}") from exc

    subject = compiled(row.subject, "subject")
    body, html_body = compiled(row.body, "text body"), compiled(row.html_body, "HTML body")
    if subject is None or (body is None and html_body is None):
        raise _Failure(f"{where} has {'no subject' if subject is None else 'neither a text nor an HTML body'}")
    return _Source(where, subject, body, html_body)


def _find_files(name: str, variants: list[str]) -> _Source | None:
    """The first variant whose subject file exists, with the body files beside it. A
    variant is its directory: a German subject never goes out over a default body."""
    for variant in variants:
        prefix = _prefix(name, variant)
        subject = _file(prefix + FILES["subject"])
        if subject is None:
            continue
        body, html_body = _file(prefix + FILES["body"]), _file(prefix + FILES["html_body"])
        where = f"the files {prefix}"
        if body is None and html_body is None:
            raise _Failure(f"{where} have a subject.txt but neither a body.txt nor a body.html")
        return _Source(where, subject, body, html_body)
    return None


def _prefix(name: str, variant: str) -> str:
    return f"{name}/{variant}/" if variant else f"{name}/"


def _file(path: str) -> Template | None:
    """The compiled file ``path`` from the first Django template engine that has it."""
    for engine in _file_engines():
        try:
            return engine.get_template(path)
        except TemplateDoesNotExist as exc:
            if exc.args and exc.args[0] != path:  # something it extends at compile time
                raise _Failure(f"{path}: {_describe(exc)}") from exc
        except TemplateSyntaxError as exc:
            raise _Failure(f"{path}: {_describe(exc)}") from exc
    return None


def _file_engines() -> list[Engine]:
    """The ``django.template.Engine`` of each Django backend in ``TEMPLATES``: rendering
    through them with a context of our own is what lets the text parts go unescaped."""
    return [backend.engine for backend in engines.all() if isinstance(backend, DjangoTemplates)]


def _engine() -> Engine:
    """The engine a database template compiles in: the first Django backend's (its tag
    libraries, and the files it may extend), else a plain one."""
    found = _file_engines()
    return found[0] if found else Engine()
