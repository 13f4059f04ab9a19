"""The chaos run's calling service: ``python -m notifications.chaos.caller``.

Calls ``notify()`` N times in its own transactions: mostly new keys, some repeats of
keys it already committed (with the same content: other content would be a conflict),
some whose transaction rolls back, some to addresses the mail server bounces, and (when
asked) poison notifications. Writes one JSON line per outcome, after the fact:
``committed`` only once the commit returned. A database error (the chaos run terminates
its session) is retried with the same key, which is safe: the key makes a repeat a no-op.
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
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.db import DatabaseError, connection, transaction

    from notifications import notify

    rng = random.Random(args.seed)
    committed: list[dict[str, Any]] = []
    poison_at = set(rng.sample(range(args.n), min(args.poison, args.n)))
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
            fields: dict[str, Any] = {
                "service": "chaos",
                "notification_id": f"n{i}",
                "user_id": f"u{i % 97}",
                "subject": f"Chaos {i}",
            }
            if i in poison_at:
                kind, fields["notification_id"] = "poison", f"poison-{i}"
            elif roll < 0.05 and committed:
                kind, fields = "repeat", dict(rng.choice(committed))
            elif roll < 0.10:
                kind, fields["notification_id"] = "rollback", f"rb{i}"
            elif roll < 0.12:
                kind, fields["user_id"] = "bounce", f"bounce-{i}"
            key = "{service}:{notification_id}:{user_id}".format(**fields)
            for attempt in range(100):
                try:
                    with transaction.atomic():
                        notify(
                            **fields,
                            to=f"{fields['user_id']}@example.com",
                            body=f"Notification {key}",
                        )
                        if kind == "rollback":
                            raise Rollback
                    break
                except Rollback:
                    break
                except DatabaseError as exc:  # session terminated, server restarting...
                    connection.close()
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    if attempt == 99:
                        print(f"giving up on {key}: {exc}", file=sys.stderr)
                        kind = "error"
            now = time.time()
            if kind in ("new", "bounce", "poison"):
                committed.append(fields)
            out.write(json.dumps({"key": key, "kind": kind, "at": now}) + "\n")


if __name__ == "__main__":
    main()
