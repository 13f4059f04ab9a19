"""The benchmark's calling process: ``python -m project.bench.caller``.

One process, one system, N emails, as fast as it goes (or paced at ``--rate``):

- ``ours``: ``notify()`` per email, or ``notify_many()`` per batch (``--mode many``);
- ``plain``: ``send_email.delay()`` per email (the plain Celery peer);
- ``postoffice``: ``mail.send()`` per email, or ``mail.send_many()`` per batch.

Writes JSON: the moment before the first call, the moment the last returned, and each
key with the moment its call returned (its commit, or its publish for the plain peer),
which is where the latency to the SMTP server is counted from.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from .sink import BODY


def email(system: str, tag: str, i: int) -> dict[str, Any]:
    user = f"u{i % 1000}"
    return {
        "service": system,
        "notification_id": f"{tag}-{i}",
        "user_id": user,
        "to": f"{user}@example.com",
        "subject": f"Your weekly summary #{i}",
        "body": BODY,
    }


def key_of(item: dict[str, Any]) -> str:
    return "{service}:{notification_id}:{user_id}".format(**item)


def senders(system: str, mode: str) -> Callable[[list[dict[str, Any]]], None]:
    """A function that sends one batch of emails the way ``system`` does."""
    import django

    django.setup()
    if system == "ours":
        from notifications import notify, notify_many

        def ours(items: list[dict[str, Any]]) -> None:
            if mode == "many":
                notify_many(items)
            else:
                for item in items:
                    notify(**item)

        return ours
    if system == "plain":
        from .peer_celery import send_email

        def plain(items: list[dict[str, Any]]) -> None:
            for item in items:
                # No header API in send_mail: the key travels as the subject.
                send_email.delay(item["to"], key_of(item), item["body"])

        return plain
    if system == "postoffice":
        from post_office import mail

        def po_kwargs(item: dict[str, Any]) -> dict[str, Any]:
            return {
                "recipients": [item["to"]],
                "subject": item["subject"],
                "message": item["body"],
                "headers": {"X-Notification-Key": key_of(item)},
                "priority": "medium",
            }

        def postoffice(items: list[dict[str, Any]]) -> None:
            if mode == "many":
                mail.send_many([po_kwargs(item) for item in items])
            else:
                for item in items:
                    mail.send(**po_kwargs(item))

        return postoffice
    raise SystemExit(f"unknown system {system!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=["ours", "plain", "postoffice"], required=True)
    parser.add_argument("--mode", choices=["single", "many"], default="single")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--batch", type=int, default=500, help="items per bulk call (--mode many)")
    parser.add_argument("--rate", type=float, default=0.0, help="emails per second (0: as fast as it goes)")
    parser.add_argument("--tag", required=True, help="makes this phase's keys unique")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    send = senders(args.system, args.mode)
    step = args.batch if args.mode == "many" else 1
    items = [email(args.system, args.tag, i) for i in range(args.n)]
    keys = [key_of(item) for item in items]
    committed: list[float] = []
    start = time.time()
    for first in range(0, args.n, step):
        if args.rate:
            delay = start + first / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
        batch = items[first : first + step]
        send(batch)
        committed.extend([time.time()] * len(batch))
    end = time.time()
    with open(args.out, "w") as out:
        json.dump({"start": start, "end": end, "keys": keys, "committed": committed}, out)


if __name__ == "__main__":
    main()
