"""An email's bytes, written directly or by Django: ``python -m project.bench.mime``
(``make bench-mime``).

For three kinds of email (ASCII text; ASCII text with an HTML alternative; non-ASCII
subject, names, domains and text) it times, in one process, what a worker does per email
before the SMTP transaction: ``mail.build_message`` and then either ``mime.prepare`` (the
fast path: envelope and bytes) or what Django's SMTP backend does (``sanitize_address`` on
the sender and the recipient, ``message().as_bytes(linesep="\\r\\n")``). Each round builds
``--messages`` different emails (a recipient and a key of their own, and for the non-ASCII
kind a subject of its own, more than the fast path keeps), Django's path and the fast path
taking turns, first one then the other; the figures are the medians over the rounds, in
microseconds per email, with ``build_message`` alone beside them (both paths include it).
A fourth kind sends the non-ASCII emails to 100 recipients over and over, with a subject
each: the header lines and envelope addresses the fast path keeps.

Needs no service: nothing is sent and no database is opened.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

KINDS = ("ascii", "html", "non-ascii", "non-ascii, 100 recipients")
BODY = "Hello Ann,\n\nyour invoice for March is ready. It comes to 1,234.56 EUR, due by the 31st.\n\n-- \nExample\n"
HTML = "<p>Hello Ann,</p>\n<p>your invoice for March is ready. It comes to <b>1,234.56 EUR</b>.</p>\n"
GERMAN = "Hallo Jörg,\n\nIhre Rechnung für März liegt bereit: 1.234,56 €, fällig bis zum 31.\n\n-- \nBücher GmbH\n"


def payloads(kind: str, count: int) -> list[dict[str, Any]]:
    """``count`` payloads of one kind, each with a recipient and a key of its own."""
    items = []
    for i in range(count):
        item: dict[str, Any] = {"key": f"billing:invoice-{i}:{i}", "subject": "Your invoice is ready", "body": BODY}
        if kind.startswith("non-ascii"):
            n = i % 100 if kind.endswith("recipients") else i  # the same 100 again and again
            item.update(
                to=f"Jörg Müller {n} <joerg.{n}@bücher.de>",
                from_email="Bücher GmbH <rechnungen@bücher.de>",
                subject=f"Ihre Rechnung Nr. {n} für März",
                body=GERMAN,
            )
        else:
            item["to"] = f"ann.{i}@example.com"
        if kind == "html":
            item["html_body"] = HTML
        items.append(item)
    return items


def timed(work: Callable[[], None]) -> float:
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    finally:
        gc.enable()


def measure(kind: str, count: int, rounds: int) -> dict[str, float]:
    from django.core.mail.message import sanitize_address

    from notifications import mail, mime

    items = payloads(kind, count)

    def build() -> None:
        for item in items:
            mail.build_message(item)

    def django() -> None:
        for item in items:
            message = mail.build_message(item)
            sanitize_address(message.from_email, "utf-8")
            [sanitize_address(address, "utf-8") for address in message.recipients()]
            message.message().as_bytes(linesep="\r\n")  # type: ignore[call-arg]

    def fast() -> None:
        for item in items:
            if mime.prepare(mail.build_message(item)) is None:
                raise AssertionError(f"{kind}: the fast path does not write {item['key']}")

    times: dict[str, list[float]] = {"django": [], "fast": [], "build": []}
    for turn in range(rounds):
        order = (("django", django), ("fast", fast)) if turn % 2 == 0 else (("fast", fast), ("django", django))
        for name, work in order:
            times[name].append(timed(work))
        times["build"].append(timed(build))
    per_email = {name: statistics.median(values) / count * 1e6 for name, values in times.items()}
    per_email["ratio"] = per_email["django"] / per_email["fast"]
    return per_email


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m project.bench.mime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="emails per round and kind")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per path and kind (they take turns)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rounds < 1:
        parser.error("--messages and --rounds must be at least 1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    print(f"{args.messages:,} emails per round, median of {args.rounds} rounds, µs per email")
    print(f"{'email':<26} {'Django':>8} {'fast':>8} {'ratio':>7} {'build_message':>14}")
    for kind in KINDS:
        figures = measure(kind, args.messages, args.rounds)
        print(
            f"{kind:<26} {figures['django']:8.1f} {figures['fast']:8.1f} {figures['ratio']:6.1f}x "
            f"{figures['build']:14.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
