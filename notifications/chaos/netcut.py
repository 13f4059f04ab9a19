"""A TCP relay between a process and PostgreSQL that can cut the line: the chaos run's
(and the tests') way to cut one worker off from its database without touching the
others or needing root.

While cut, the relay neither reads nor accepts: the worker's packets are taken by the
kernel and never answered, its statements hang, and nothing tells it so, which is what
a partition or a hung network path looks like from the worker's side. Restored, the
bytes that waited flow on, late, as they would after a partition heals.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

# Kafka request types the line counts when told to (``kafka=True``): a consumer group's
# rebalance shows as every member joining and syncing again.
KAFKA_GROUP_REQUESTS = {11: "JoinGroup", 13: "LeaveGroup", 14: "SyncGroup"}


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    pending: dict[socket.socket, bytes] = field(default_factory=dict)
    head: bytearray = field(default_factory=bytearray)  # Kafka: the request header read so far
    skip: int = 0  # Kafka: bytes of the current request still to pass

    def requests(self, data: bytes) -> list[int]:
        """The api keys of the Kafka requests that begin in ``data`` (client to broker:
        each a 4-byte size, then a 2-byte api key)."""
        keys, i = [], 0
        while i < len(data):
            if self.skip:
                n = min(self.skip, len(data) - i)
                self.skip -= n
                i += n
                continue
            take = data[i : i + 6 - len(self.head)]
            self.head += take
            i += len(take)
            if len(self.head) == 6:
                keys.append(int.from_bytes(self.head[4:6], "big"))
                self.skip = max(0, int.from_bytes(self.head[:4], "big", signed=True) - 2)
                self.head = bytearray()
        return keys

    def other(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client


class LineCut:
    """``LineCut(port=5432).start()`` listens on 127.0.0.1:``self.port`` and forwards to
    the target (PostgreSQL, or the chaos run's Kafka broker); ``cut()`` and ``restore()``
    switch the line; ``drop()`` closes its connections; ``stop()`` closes it all."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432, kafka: bool = False) -> None:
        self.target = (host, port)
        self.kafka = kafka
        self.group_requests: list[tuple[float, str]] = []  # Kafka: (wall time, request type)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.selector = selectors.DefaultSelector()
        self.pairs: dict[socket.socket, _Pair] = {}
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._forwarding = threading.Lock()  # held while the loop moves bytes
        self._thread = threading.Thread(target=self._run, name="netcut", daemon=True)

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def start(self) -> LineCut:
        self.selector.register(self.listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def cut(self) -> None:
        """Cut the line: once this returns, not a byte more goes either way."""
        with self._forwarding:
            self._cut.set()

    def restore(self) -> None:
        self._cut.clear()

    def drop(self) -> int:
        """Close every connection through the line at once (both ends see it closed, as
        after a broker or network reset); new ones are taken as before. Returns how many."""
        with self._forwarding:
            pairs = {id(p): p for p in self.pairs.values()}
            for pair in pairs.values():
                self._close(pair)
        return len(pairs)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in list(self.pairs):
            sock.close()
        self.listener.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._cut.is_set():
                self._stop.wait(0.05)
                continue
            ready = self.selector.select(timeout=0.05)
            with self._forwarding:
                if self._cut.is_set():  # cut while select waited: those bytes stay put
                    continue
                for key, _ in ready:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self.listener:
                        self._accept()
                    elif sock in self.pairs:
                        self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        pair = _Pair(client, server)
        for sock in (client, server):
            sock.setblocking(False)
            self.pairs[sock] = pair
            self.selector.register(sock, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        pair = self.pairs[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(pair)
            return
        if self.kafka and sock is pair.client:
            now = time.time()
            kinds = [KAFKA_GROUP_REQUESTS[k] for k in pair.requests(data) if k in KAFKA_GROUP_REQUESTS]
            self.group_requests += [(now, kind) for kind in kinds]
        try:
            pair.other(sock).sendall(data)
        except BlockingIOError:  # the peer's buffer is full: finish in blocking mode
            target = pair.other(sock)
            target.setblocking(True)
            try:
                target.sendall(data)
            finally:
                target.setblocking(False)
        except OSError:
            self._close(pair)

    def _close(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.server):
            if sock in self.pairs:
                self.selector.unregister(sock)
                del self.pairs[sock]
            sock.close()
