"""The chaos run's calling service: ``python -m notifications.chaos.caller``.

Calls ``notify()`` N times in its own transactions: mostly new keys, some repeats of
calls it already committed (with the same content: other content would be a
conflict), some whose transaction rolls back, some to addresses the
mail server bounces, and (when asked) poison notifications, notifications whose only
message cannot be decoded (as an earlier release wrote them), and notifications of up
to and over the largest message size. Writes one JSON line per outcome, after the fact:
``committed`` only once the commit returned. A database error (the chaos run terminates
its session) is retried with the same key, which is safe: the key makes a repeat a
no-op.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="calls per second (0: as fast as it goes)")
    parser.add_argument("--poison", type=int, default=0, help="how many poison notifications")
    parser.add_argument("--undecodable", type=int, default=0, help="how many sent in undecodable messages")
    parser.add_argument("--oversized", type=int, default=0, help="how many large and too-large notifications")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.db import DatabaseError, connection, transaction

    import project.celery  # noqa: F401  (the app the undecodable messages go out with)
    from notifications import InvalidNotification, notify

    rng = random.Random(args.seed)
    committed: list[dict[str, Any]] = []
    poison_at = set(rng.sample(range(args.n), min(args.poison, args.n)))
    special = rng.sample(
        [i for i in range(args.n) if i not in poison_at], min(args.n // 4, 2 * args.undecodable + 2 * args.oversized)
    )
    undecodable_at = set(special[: args.undecodable])
    large_at = set(special[args.undecodable : args.undecodable + args.oversized])
    too_large_at = set(special[args.undecodable + args.oversized : args.undecodable + 2 * args.oversized])
    start = time.monotonic()

    class Rollback(Exception):
        pass

    with open(args.out, "w", buffering=1) as out:
        for i in range(args.n):
            if args.rate:
                delay = start + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            roll = rng.random()
            kind = "new"
            fields: dict[str, Any] = {"service": "chaos", "notification_id": f"n{i}", "user_id": f"u{i % 97}"}
            extra: dict[str, Any] = {}
            if i in poison_at:
                kind, fields["notification_id"] = "poison", f"poison-{i}"
            elif i in undecodable_at:
                kind, fields["notification_id"] = "undecodable", f"undecodable-{i}"
                extra["metadata"] = TYPED
            elif i in large_at:  # 1.8 MB of JSON: a message of its own, delivered
                kind, fields["notification_id"] = "large", f"large-{i}"
                extra["body"] = "é" * 300_000
            elif i in too_large_at:  # 4.8 MB of JSON: more than a message may carry
                kind, fields["notification_id"] = "oversized", f"oversized-{i}"
                extra["body"] = "\x01" * 800_000
            elif roll < 0.05 and committed:
                kind = "repeat"
            elif roll < 0.10:
                kind, fields["notification_id"] = "rollback", f"rb{i}"
            elif roll < 0.12:
                kind, fields["user_id"] = "bounce", f"bounce-{i}"
            key = "{service}:{notification_id}:{user_id}".format(**fields)
            call: dict[str, Any] = {"to": f"{fields['user_id']}@example.com", "subject": f"Chaos {i}"}
            call["body"] = f"Notification {key}"
            call.update(fields, **extra)
            if kind == "repeat":  # the same call again, as a retrying caller would make it
                call = dict(rng.choice(committed))
                key = "{service}:{notification_id}:{user_id}".format(**call)
            for attempt in range(100):
                try:
                    with transaction.atomic():
                        n = notify(**call)
                        if kind == "rollback":
                            raise Rollback
                        if kind == "undecodable":
                            n.outbox_messages.all().delete()  # its only message is the one below
                    if kind == "undecodable":
                        _publish_undecodable(n)
                    break
                except Rollback:
                    break
                except InvalidNotification as exc:
                    kind = "refused" if kind == "oversized" else "invalid"
                    print(f"{key}: {exc}", file=sys.stderr)
                    break
                except DatabaseError as exc:  # session terminated, server restarting...
                    connection.close()
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    if attempt == 99:
                        print(f"giving up on {key}: {exc}", file=sys.stderr)
                        kind = "error"
            now = time.time()
            if kind in ("new", "bounce"):
                committed.append(call)
            out.write(json.dumps({"key": key, "kind": kind, "at": now}) + "\n")


TYPED = {"__type__": "x", "__value__": 1}  # kombu's decoder takes this for a typed value


def _publish_undecodable(n: Any) -> None:
    """The notification's delivery message as an earlier release published it (metadata
    as a JSON object), which the workers cannot decode."""
    from celery import current_app

    from notifications import broker
    from notifications.managers import NOTIFICATION_COLUMNS

    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    payload["created_at"] = n.created_at.isoformat()
    for attempt in range(50):
        try:
            current_app.send_task(broker.DELIVER_MANY_TASK, args=[[payload]], queue=broker.queues()[0])  # type: ignore[arg-type]
            return
        except Exception:  # the broker is restarting: the notification must still get its message
            time.sleep(min(0.1 * 2**attempt, 2.0))
    raise SystemExit(f"could not publish the undecodable message of {n.key}")


if __name__ == "__main__":
    main()
