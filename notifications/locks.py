"""The Redis fast path: a redis-py ``Lock`` per key, so two workers rarely race to the
database claim. It is an optimisation only: PostgreSQL decides, so a lost or flushed
lock, or Redis being down, costs work but never a second email."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import redis
from redis.exceptions import LockError, RedisError

from .conf import settings

logger = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # Short timeouts: a dead Redis must not stall deliveries, it only loses the fast path.
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


@contextmanager
def fast_path(key: str, ttl: float) -> Iterator[bool]:
    """Yield False if another worker holds the key's lock (skip it for now), else True.

    Redis errors yield True: the database claim still protects the key.
    """
    lock = client().lock(f"{settings.REDIS_KEY_PREFIX}lock:{key}", timeout=ttl, blocking=False)
    try:
        acquired = bool(lock.acquire())
    except RedisError as exc:
        logger.warning("redis lock unavailable for %s, relying on the database claim: %s", key, exc)
        yield True
        return
    try:
        yield acquired
    finally:
        if acquired:
            try:
                lock.release()
            except (LockError, RedisError):
                # Expired, flushed or Redis restarted: nothing to release.
                pass


def set_once(name: str, ttl: float) -> bool:
    """SET NX with a TTL: True if this caller set it. Redis errors count as set."""
    try:
        return bool(client().set(f"{settings.REDIS_KEY_PREFIX}{name}", b"1", nx=True, px=int(ttl * 1000)))
    except RedisError:
        return True


def clear(name: str) -> None:
    try:
        client().delete(f"{settings.REDIS_KEY_PREFIX}{name}")
    except RedisError:
        pass
