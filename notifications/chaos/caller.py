"""The chaos run's calling service: ``python -m notifications.chaos.caller``.

Calls ``notify()`` N times in its own transactions: mostly new keys, some repeats of
calls it already committed (with the same content: other content would be a
conflict), some whose transaction rolls back, some to addresses the
mail server bounces, and (when asked) poison notifications, notifications whose only
message cannot be decoded (as an earlier release wrote them), and notifications of up
to and over the largest message size.

Beside the plain ones, a share of each kind the contract covers (``--mix``): scheduled
(``send_at`` 1 to 15 s ahead), expiring (``expires_at`` 2 to 30 s ahead, some scheduled
too), cancelled (``cancel(key)`` 0 to 3 s after the commit, racing the send), templated
(``template="chaos/notice"``, from the run's template files), high priority; one burst
of bulk notifications in one ``notify_many()``; and each goes through one of the named
backends (``--backends``), a share (``--bulk-share``) through the rate-limited one.

Writes one JSON line per outcome, after the fact: ``committed`` only once the commit
returned, and a ``cancel`` line with what ``cancel()`` said once it returned. A database
error (the chaos run terminates its session) is retried with the same key, which is
safe: the key makes a repeat a no-op. What it was asked to send, and what it skipped and
why, goes to ``--meta`` as JSON.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

# Shares of all calls, beside the fixed ones (5% repeats, 5% rollbacks, 2% bounces);
# what is left is plain.
DEFAULT_MIX = {"scheduled": 0.12, "expiring": 0.12, "cancelled": 0.10, "templated": 0.08, "high": 0.08}
FIXED_SHARE = 0.12
TEMPLATE = "chaos/notice"
# Kinds whose call committed a notification the run must see settled.
TRAFFIC_KINDS = ("scheduled", "expiring", "cancelled", "templated", "high", "burst")
# The keys this caller cancels itself: what the admin probe must not select, or it would
# see the caller's cancel as a change its actions made.
CANCELLED_PREFIX = "chaos:cancelled-"


def parse_mix(text: str) -> dict[str, float]:
    """``kind=share,...`` (or JSON) over ``DEFAULT_MIX``; raises ``ValueError`` for an
    unknown kind or shares that leave no room for the fixed ones."""
    mix = dict(DEFAULT_MIX)
    text = text.strip()
    if text:
        given = json.loads(text) if text.startswith("{") else dict(p.split("=", 1) for p in text.split(","))
        for kind, share in given.items():
            if kind.strip() not in DEFAULT_MIX:
                raise ValueError(f"unknown kind {kind!r} in the mix (kinds: {', '.join(DEFAULT_MIX)})")
            mix[kind.strip()] = float(share)
    if any(v < 0 for v in mix.values()) or sum(mix.values()) > 1.0 - FIXED_SHARE + 1e-9:
        raise ValueError(f"mix shares must be >= 0 and add up to at most {1.0 - FIXED_SHARE:.2f}: {mix}")
    return mix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="calls per second (0: as fast as it goes)")
    parser.add_argument("--poison", type=int, default=0, help="how many poison notifications")
    parser.add_argument("--undecodable", type=int, default=0, help="how many sent in undecodable messages")
    parser.add_argument("--oversized", type=int, default=0, help="how many large and too-large notifications")
    parser.add_argument("--mix", default="", help="shares of the kinds, e.g. scheduled=0.1,high=0.05")
    parser.add_argument("--backends", default="", help="backend names: the first for high priority, the last bulk")
    parser.add_argument("--bulk-share", type=float, default=0.5, help="share of notifications through the last")
    parser.add_argument("--burst", type=int, default=0, help="notifications in one notify_many() to the bulk one")
    parser.add_argument("--out", required=True)
    parser.add_argument("--meta", default="")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.db import DatabaseError, connection, transaction
    from django.utils import timezone

    import project.celery  # noqa: F401  (the app the undecodable messages go out with)
    from notifications.conf import settings as conf

    on_kafka = conf.BROKER == "kafka"
    from notifications import InvalidNotification, cancel, notify, notify_many
    from notifications.backends import default_name

    rng = random.Random(args.seed)
    mix = parse_mix(args.mix)
    names = [b for b in args.backends.split(",") if b]
    transactional, bulk = (names[0], names[-1]) if names else (None, None)
    templated = _template_probe()
    if not templated["enabled"]:
        print(f"templated traffic skipped: {templated['note']}", file=sys.stderr)
    committed: list[dict[str, Any]] = []
    poison_at = set(rng.sample(range(args.n), min(args.poison, args.n)))
    special = rng.sample(
        [i for i in range(args.n) if i not in poison_at], min(args.n // 4, 2 * args.undecodable + 2 * args.oversized)
    )
    undecodable_at = set(special[: args.undecodable])
    large_at = set(special[args.undecodable : args.undecodable + args.oversized])
    too_large_at = set(special[args.undecodable + args.oversized : args.undecodable + 2 * args.oversized])
    # The burst takes the calls from the middle of the run on, all at once.
    burst = max(0, min(args.burst, args.n // 4)) if bulk else 0
    burst_at = next((i for i in range(args.n // 2, args.n) if i not in poison_at and i not in special), args.n)
    start = time.monotonic()
    cancels: list[tuple[float, str]] = []  # (monotonic due time, key), a heap

    class Rollback(Exception):
        pass

    def retrying(what: str, fn: Callable[[], Any]) -> tuple[Any, int, BaseException | None]:
        """``fn()`` until no database error (the run terminates sessions): its result,
        the attempts it took, and the last error if it never succeeded."""
        error: BaseException | None = None
        for attempt in range(100):
            try:
                return fn(), attempt + 1, None
            except DatabaseError as exc:  # session terminated, server restarting...
                error = exc
                connection.close()
                time.sleep(min(0.05 * 2**attempt, 1.0))
        print(f"giving up on {what}: {error}", file=sys.stderr)
        return None, 100, error

    def cancel_due(out: Any, until: float) -> None:
        """Run the cancels due by ``until`` (monotonic), sleeping between them."""
        while cancels and cancels[0][0] <= until:
            due, key = heapq.heappop(cancels)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            asked = time.time()
            result, attempts, error = retrying(f"cancel {key}", functools.partial(cancel, key))
            line: dict[str, Any] = {"key": key, "kind": "cancel", "asked_at": asked, "at": time.time()}
            if error is not None:
                line["kind"] = "cancel_error"
            else:
                line.update(cancelled=result.cancelled, in_time=result.in_time, status=result.status)
            line["attempts"] = attempts
            out.write(json.dumps(line) + "\n")

    def backend_for(roll: float) -> str | None:
        if bulk is None:
            return None
        if roll < args.bulk_share:
            return bulk
        return transactional if roll < (1 + args.bulk_share) / 2 else None  # None: the default

    with open(args.out, "w", buffering=1) as out:
        i = 0
        while i < args.n:
            if args.rate:
                due = start + i / args.rate
                cancel_due(out, due)
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            else:
                cancel_due(out, time.monotonic())
            if i == burst_at and burst and bulk is not None:
                i += _burst(out, i, burst, bulk, notify_many, retrying, DatabaseError, default_name)
                continue
            roll = rng.random()
            kind = "new"
            fields: dict[str, Any] = {"service": "chaos", "notification_id": f"n{i}", "user_id": f"u{i % 97}"}
            extra: dict[str, Any] = {}
            record: dict[str, Any] = {}
            backend = backend_for(rng.random())
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
            elif roll < FIXED_SHARE:
                kind, fields["user_id"] = "bounce", f"bounce-{i}"
            else:
                kind = _pick(mix, (roll - FIXED_SHARE) / (1.0 - FIXED_SHARE))
                if kind == "templated" and not templated["enabled"]:
                    kind = "new"
                now = timezone.now()
                if kind == "scheduled":
                    extra["send_at"] = now + timedelta(seconds=rng.uniform(1.0, 15.0))
                elif kind == "expiring":
                    ttl = rng.uniform(2.0, 30.0)
                    extra["expires_at"] = now + timedelta(seconds=ttl)
                    if rng.random() < 0.3:  # scheduled too, some of them too close to the expiry to make it
                        extra["send_at"] = now + timedelta(seconds=rng.uniform(1.0, min(15.0, ttl - 0.2)))
                elif kind == "cancelled":
                    if rng.random() < 0.5:  # scheduled: the cancel is most likely in time
                        extra["send_at"] = now + timedelta(seconds=rng.uniform(1.0, 15.0))
                    # Half right after the commit, racing the relay and the workers.
                    record["cancel_in"] = rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.0, 3.0)
                elif kind == "templated":
                    token = f"{rng.getrandbits(48):012x}"
                    extra["template"] = TEMPLATE
                    extra["context"] = {"token": token, "key": "{service}:{notification_id}:{user_id}".format(**fields)}
                    record["expected_subject"] = f"Chaos notice {token}"
                elif kind == "high":
                    extra["priority"] = "high"
                    backend = transactional
            if kind in TRAFFIC_KINDS:
                fields["notification_id"] = f"{kind}-{i}"
            key = "{service}:{notification_id}:{user_id}".format(**fields)
            call: dict[str, Any] = {"to": f"{fields['user_id']}@example.com", "subject": f"Chaos {i}"}
            call["body"] = f"Notification {key}"
            call.update(fields, **extra)
            if "template" in call:
                del call["subject"], call["body"]
            if backend is not None and kind not in ("poison", "undecodable", "large", "oversized"):
                call["backend"] = backend
            if kind == "repeat":  # the same call again, as a retrying caller would make it
                call = dict(rng.choice(committed))
                key = "{service}:{notification_id}:{user_id}".format(**call)
            retried = False
            for attempt in range(100):
                try:
                    with transaction.atomic():
                        n = notify(**call)
                        if kind == "rollback":
                            raise Rollback
                        if kind == "undecodable":
                            n.outbox_messages.all().delete()  # its only message is the one below
                            if on_kafka:  # as the relay leaves it: published, never claimed
                                type(n).objects.filter(pk=n.pk).update(status="published", published_at=timezone.now())
                    if kind == "undecodable":
                        _publish_undecodable(n)
                    break
                except Rollback:
                    break
                except InvalidNotification as exc:
                    if kind == "expiring" and retried and exc.field == "expires_at":
                        # Expired while the database was away: committed or not, unknown.
                        kind = "expiring_uncertain"
                    else:
                        kind = "refused" if kind == "oversized" else "invalid"
                    print(f"{key}: {exc}", file=sys.stderr)
                    break
                except DatabaseError as exc:  # session terminated, server restarting...
                    retried = True
                    connection.close()
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    if attempt == 99:
                        print(f"giving up on {key}: {exc}", file=sys.stderr)
                        kind = "error"
            now_wall = time.time()
            if kind in ("new", "bounce"):
                committed.append(call)
            line = {"key": key, "kind": kind, "at": now_wall, **_shape(call, default_name())}
            line.update({k: v for k, v in record.items() if k != "cancel_in"})
            out.write(json.dumps(line) + "\n")
            if kind == "cancelled":
                heapq.heappush(cancels, (time.monotonic() + record["cancel_in"], key))
            i += 1
        cancel_due(out, float("inf"))
    if args.meta:
        meta = {
            "mix": mix,
            "fixed": {"repeat": 0.05, "rollback": 0.05, "bounce": 0.02},
            "backends": names,
            "bulk_share": args.bulk_share if bulk else 0.0,
            "burst": burst,
            "templated": templated,
        }
        with open(args.meta, "w") as handle:
            json.dump(meta, handle, indent=2)


def _pick(mix: dict[str, float], roll: float) -> str:
    """The kind whose share ``roll`` (0..1 of the calls beside the fixed ones) falls in."""
    edge = 0.0
    for kind, share in mix.items():
        edge += share / (1.0 - FIXED_SHARE)
        if roll < edge:
            return kind
    return "new"


def _shape(call: dict[str, Any], default_backend: str) -> dict[str, Any]:
    """What the judge needs of a call besides its key: the moments as epoch seconds, the
    priority, and the backend it names (resolved)."""
    out: dict[str, Any] = {
        "backend": call.get("backend") or default_backend,
        "priority": call.get("priority") or "normal",
    }
    for name in ("send_at", "expires_at"):
        value = call.get(name)
        if isinstance(value, datetime):
            out[name] = value.timestamp()
    return out


def _burst(
    out: Any, first: int, count: int, bulk: str, notify_many: Any, retrying: Any, error: Any, default: Any
) -> int:
    """``count`` bulk notifications in one ``notify_many()``: the rate limit's test."""
    items = [
        {
            "service": "chaos",
            "notification_id": f"burst-{first + j}",
            "user_id": f"u{(first + j) % 97}",
            "to": f"u{(first + j) % 97}@example.com",
            "subject": f"Chaos burst {first + j}",
            "body": f"Burst notification {first + j}",
            "backend": bulk,
        }
        for j in range(count)
    ]
    written, _, failed = retrying(f"the burst at {first}", lambda: notify_many(items))
    now = time.time()
    for item, n in zip(items, written or [None] * len(items), strict=True):
        kind = "error" if failed is not None else "burst"
        key = n.key if n is not None else "{service}:{notification_id}:{user_id}".format(**item)
        out.write(json.dumps({"key": key, "kind": kind, "at": now, **_shape(item, default())}) + "\n")
    return count


def _template_probe() -> dict[str, Any]:
    """Whether this build renders the run's template: templated traffic is skipped (and
    the report says so) only when rendering says the template does not exist."""
    from notifications import InvalidNotification
    from notifications.conf import settings
    from notifications.rendering import render

    try:
        rendered = render(TEMPLATE, {"token": "probe", "key": "chaos:probe:u0"}, "", settings.DATABASE)
    except InvalidNotification as exc:
        if "does not exist" in str(exc):
            return {
                "enabled": False,
                "note": f"notifications.rendering refused the run's template ({exc}); its share went out as plain "
                "notifications",
            }
        return {"enabled": True, "note": f"the probe render failed (calls will show it): {exc}"}
    return {"enabled": True, "note": f"the probe rendered subject {rendered.subject!r}"}


TYPED = {"__type__": "x", "__value__": 1}  # kombu's decoder takes this for a typed value


def _publish_undecodable(n: Any) -> None:
    """The notification's delivery message as an earlier release published it (metadata
    as a JSON object), which the workers cannot decode."""
    from celery import current_app

    from notifications import broker
    from notifications.conf import settings
    from notifications.managers import NOTIFICATION_COLUMNS

    if settings.BROKER == "kafka":
        _publish_undecodable_to_kafka(n)
        return
    payload = {c: getattr(n, c) for c in NOTIFICATION_COLUMNS}
    payload["created_at"] = n.created_at.isoformat()
    for c in ("send_at", "expires_at"):
        if payload.get(c) is not None:
            payload[c] = payload[c].isoformat()
    queue = next(q for q in broker.queues() if q.name == settings.DELIVER_QUEUE)  # the normal one
    for attempt in range(50):
        try:
            current_app.send_task(broker.DELIVER_MANY_TASK, args=[[payload]], queue=queue)  # type: ignore[arg-type]
            return
        except Exception:  # the broker is restarting: the notification must still get its message
            time.sleep(min(0.1 * 2**attempt, 2.0))
    raise SystemExit(f"could not publish the undecodable message of {n.key}")


def _publish_undecodable_to_kafka(n: Any) -> None:
    """On Kafka: a message in the delivery topic that is no JSON a worker can read (a
    message corrupted on its way): the consumer copies it to the dead-letter topic, and
    the notification, published and never claimed, must be published again by the
    recovery (``NOTIFICATIONS_RECOVER_UNCLAIMED_AFTER``)."""
    from confluent_kafka import KafkaException, Producer

    from notifications import kafka
    from notifications.conf import settings

    producer = Producer({**kafka.client_config(), "enable.idempotence": True, "acks": "all"})
    value = b"\xff undecodable: " + n.key.encode()
    reports: list[Any] = []
    for attempt in range(50):
        reports.clear()
        try:
            kafka.ensure_topics()
            producer.produce(
                str(settings.KAFKA_TOPIC),
                value=value,
                key=str(n.user_id).encode(),
                on_delivery=lambda err, msg: reports.append(err),
            )
            producer.flush(10)
            if reports and reports[0] is None:
                return
        except (KafkaException, BufferError):
            pass
        kafka._reset()  # a broker that lost its log lost the topics too: create them again
        time.sleep(min(0.1 * 2**attempt, 2.0))  # the broker is restarting: the notification must still get it
    raise SystemExit(f"could not publish the undecodable message of {n.key}")


if __name__ == "__main__":
    main()
