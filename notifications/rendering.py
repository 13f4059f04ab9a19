"""Templates: ``notify(template=...)`` renders subject and bodies with Django's template
engine, in the caller, so the broker message still carries the whole email.

(Interface only; the sources are filled in below.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .exceptions import InvalidNotification


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str
    html_body: str


def render(name: Any, context: Any, language: str, using: str) -> Rendered:
    raise InvalidNotification("template", f"{name!r} does not exist")
