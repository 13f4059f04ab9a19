"""The Redis fast path: a lock per key, so two workers rarely race to the database
claim. It is an optimisation only: PostgreSQL decides, so a lost or flushed
lock, or Redis being down, costs work but never a second email."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import redis
from redis.exceptions import RedisError
from redis.lock import Lock

from .conf import settings

logger = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # Short timeouts: a dead Redis must not stall deliveries, it only loses the fast path.
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


@lru_cache(maxsize=4)
def _release_script(url: str) -> Any:
    # redis-py's own release: delete the key only if it still holds our token.
    return _client(url).register_script(Lock.LUA_RELEASE_SCRIPT)


def _key(name: str) -> str:
    return f"{settings.REDIS_KEY_PREFIX}{name}"


def _name(key: str) -> str:
    return _key(f"lock:{key}")


@dataclass
class Locked:
    """What ``fast_path`` took: the keys this worker holds (``token`` is their lock's
    value), and for the others how long until their lock runs out."""

    keys: set[str]
    token: bytes | None
    busy_for: dict[str, float] = field(default_factory=dict)


@contextmanager
def fast_path(keys: Sequence[str], ttl: float) -> Iterator[Locked]:
    """Lock a batch of keys, as redis-py's ``Lock`` would lock each (SET NX PX with a
    random token, released by its compare-and-delete script), in one pipelined round
    trip each way. Yield the keys this worker holds; the others are being delivered by
    another worker right now, so skip them until their lock runs out (``busy_for``).
    The holder's lease renewals extend the locks (``extend``), so a lock lives as long
    as the claim it guards and no longer.

    Redis errors yield every key: the database claim still protects them.
    """
    c = client()
    token = uuid.uuid4().hex.encode()
    px = max(1, int(ttl * 1000))
    try:
        with c.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(_name(key), token, nx=True, px=px)
            acquired = pipe.execute()
            others = [key for key, ok in zip(keys, acquired, strict=True) if not ok]
            for key in others:
                pipe.pttl(_name(key))
            left = pipe.execute() if others else []
    except RedisError as exc:
        logger.warning("redis locks unavailable, relying on the database claim: %s", exc)
        yield Locked(set(keys), None)
        return
    mine = {key for key, ok in zip(keys, acquired, strict=True) if ok}
    busy_for = {key: max(0, int(ms)) / 1000 for key, ms in zip(others, left, strict=True)}
    try:
        yield Locked(mine, token, busy_for)
    finally:
        if mine:
            try:
                release = _release_script(settings.REDIS_URL)
                with c.pipeline(transaction=False) as pipe:
                    for key in mine:
                        release(keys=[_name(key)], args=[token], client=pipe)
                    pipe.execute()
            except RedisError:
                # Expired, flushed or Redis restarted: nothing to release.
                pass


@lru_cache(maxsize=4)
def _extend_script(url: str) -> Any:
    # redis-py's own: set the lock's time to live anew if it still holds our token.
    return _client(url).register_script(Lock.LUA_REACQUIRE_SCRIPT)


def extend(tokens: dict[str, bytes], ttl: float) -> None:
    """Give the fast-path locks of ``tokens`` (key -> lock token) ``ttl`` seconds anew,
    in one pipelined round trip; a lock another worker holds now is left alone."""
    if not tokens:
        return
    try:
        reacquire = _extend_script(settings.REDIS_URL)
        with client().pipeline(transaction=False) as pipe:
            for key, token in tokens.items():
                reacquire(keys=[_name(key)], args=[token, max(1, int(ttl * 1000))], client=pipe)
            pipe.execute()
    except RedisError:
        pass  # the fast path only saves work; the database lease decides


def clear(name: str) -> None:
    try:
        client().delete(_key(name))
    except RedisError:
        pass


def raise_flag(flag: str, ttl: float, listener: str) -> tuple[bool, bool]:
    """SET NX the ``flag`` and look for the ``listener``'s heartbeat, in one round trip:
    (this call set the flag, a listener is alive). Redis errors count as (set, none)."""
    try:
        with client().pipeline(transaction=False) as pipe:
            pipe.set(_key(flag), b"1", nx=True, px=int(ttl * 1000))
            pipe.exists(_key(listener))
            newly, alive = pipe.execute()
        return bool(newly), bool(alive)
    except RedisError:
        return True, False


def push(name: str) -> bool:
    """Wake a listener blocked in ``wait(name)``; False if Redis is unreachable."""
    try:
        client().rpush(_key(name), b"1")
        return True
    except RedisError:
        return False


def exists(name: str) -> bool:
    """Whether the key is there; False if Redis is unreachable."""
    try:
        return bool(client().exists(_key(name)))
    except RedisError:
        return False


def heartbeat(name: str, ttl: float) -> None:
    try:
        client().set(_key(name), b"1", px=int(ttl * 1000))
    except RedisError:
        pass


@lru_cache(maxsize=4)
def _blocking_client(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout + 2.0, socket_connect_timeout=0.5)


def wait(name: str, timeout: float) -> bool:
    """Block until ``push(name)`` or ``timeout`` seconds; then forget further pushes
    (they asked for the pass that follows). True if woken."""
    try:
        c = _blocking_client(settings.REDIS_URL, timeout)
        woken = c.blpop([_key(name)], timeout=max(timeout, 0.01)) is not None
        if woken:
            c.delete(_key(name))
        return woken
    except RedisError:
        time.sleep(timeout)
        return False
